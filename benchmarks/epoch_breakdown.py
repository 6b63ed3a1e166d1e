"""Where an epoch's time goes, and how much of it is overhead beyond the model passes it cannot avoid.

Runs a few epochs of a recipe (default `tiny-test`; any local diffusers folder can replace the base model),
then times, bare and in the same process, the passes an epoch must make:
  - UNet forwards while sampling (batched CFG, one per denoising step and sampling batch),
  - VAE decodes (in the recipe's decode slices),
  - CLIP image forwards (in the reward's chunks),
  - UNet forward + backward while training (one per trained timestep and minibatch),
  - with train.kl_coef > 0, the reference policy's forward (adapter off) at each trained timestep.
overhead ratio = measured epoch wall time / sum of those bare passes (1.0 would mean zero overhead).

    python benchmarks/epoch_breakdown.py                       # tiny-test
    python benchmarks/epoch_breakdown.py --base /path/to/sd-folder sample.num_steps=10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_grpo.cli import _quiet_libraries
from lora_grpo.config import load_config
from lora_grpo.recipe_files import find_recipe
from lora_grpo.tracking import epoch_work
from lora_grpo.train import Trainer


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_pass_seconds(trainer: Trainer, repeats: int) -> dict[str, float]:
    """Seconds per epoch of each unavoidable model pass, timed bare with the epoch's own shapes."""
    cfg, acc, model = trainer.config, trainer.accelerator, trainer.model
    device = trainer.device
    unet = model.unet
    s = cfg.sample
    n = s.prompts_per_batch * s.group_size  # samples per sampling batch
    cfg_mult = 2 if model.uncond is not None else 1
    channels = unet.config.in_channels
    size = model.latent_size
    dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    cond = model.encode([""]).expand(n * cfg_mult)  # the real conditioning's shapes (SDXL's included)
    latents = torch.randn(n * cfg_mult, channels, size, size, device=device, dtype=dtype)
    t = torch.full((n * cfg_mult,), 500, device=device)

    def unet_sampling():
        with torch.no_grad(), acc.autocast():
            unet(latents, t, **cond.unet_kwargs())

    vae = model.vae
    z = torch.randn(
        n, vae.config.latent_channels, size, size, device=device, dtype=next(vae.parameters()).dtype
    )

    def vae_decode():
        with torch.no_grad():
            for i in range(0, n, s.decode_batch_size):
                vae.decode(z[i : i + s.decode_batch_size])

    images = torch.rand(
        n, 3, size * trainer.pipe.vae_scale_factor, size * trainer.pipe.vae_scale_factor, device=device
    )
    backend = trainer.reward_fn.backend
    chunk = cfg.reward.clip.batch_size

    def clip_images():
        for i in range(0, n, chunk):
            backend.encode_images(images[i : i + chunk])

    # a minibatch's rows: the guided step (grpo-clip) takes both CFG halves, a denoising objective one
    b = cfg.train.batch_size * (cfg_mult if cfg.train.objective == "grpo-clip" else 1)
    train_latents = latents[:b].detach()
    train_cond = cond.rows(slice(0, b))
    train_t = t[:b]

    def unet_train():
        unet.train()
        with acc.autocast():
            out = unet(train_latents, train_t, **train_cond.unet_kwargs()).sample
        out.float().mean().backward()
        unet.zero_grad(set_to_none=True)

    def unet_reference():
        with torch.no_grad(), acc.autocast():
            unet(train_latents, train_t, **train_cond.unet_kwargs())

    work = epoch_work(cfg)
    train_passes = work["training_calls"]  # trained steps within the stochastic window
    per_epoch = {
        "unet_sampling": timed(unet_sampling, repeats, device) * work["sampling_calls"],
        "vae_decode": timed(vae_decode, repeats, device) * s.batches_per_epoch,
        "clip_images": timed(clip_images, repeats, device) * s.batches_per_epoch,
        "unet_train": timed(unet_train, repeats, device) * train_passes,
    }
    if cfg.train.uses_kl:
        # with the KL penalty on, the reference policy's forward is part of every trained step
        per_epoch["unet_reference"] = timed(unet_reference, repeats, device) * train_passes
    return per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="tiny-test")
    parser.add_argument("--base", help="a local diffusers folder to use as the base model")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs to run (the first is a warm-up, not counted)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each bare pass")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    args = parser.parse_args()
    _quiet_libraries()

    overrides = [*args.overrides, f"train.epochs={args.epochs}", "output.sample_grid_every=0"]
    if args.base:
        overrides.append(f"model.base={args.base}")
    config = load_config(find_recipe(args.recipe), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp), log=lambda line: None)
        trainer.run()
        from lora_grpo.tracking import read_jsonl

        rows = read_jsonl(Path(tmp) / "metrics.jsonl")[1:]  # drop the warm-up epoch
        bare = bare_pass_seconds(trainer, args.repeats)

    def mean(key: str) -> float:
        return statistics.mean(r.get(key, 0.0) for r in rows)

    epoch = mean("time_epoch")
    print(f"recipe {config.name}  base {trainer.base_ref}  device {trainer.device}  epochs timed {len(rows)}")
    print(f"{'phase':<12}{'seconds/epoch':>14}{'share':>8}")
    for phase in ("sampling", "decode", "reward", "train"):
        sec = mean(f"time_{phase}")
        print(f"{phase:<12}{sec:>14.3f}{sec / epoch:>8.1%}")
    other = epoch - sum(mean(f"time_{p}") for p in ("sampling", "decode", "reward", "train"))
    print(f"{'other':<12}{other:>14.3f}{other / epoch:>8.1%}")
    print(f"{'epoch':<12}{epoch:>14.3f}")
    print()
    print(f"{'bare pass':<16}{'seconds/epoch':>14}")
    for name, sec in bare.items():
        print(f"{name:<16}{sec:>14.3f}")
    total = sum(bare.values())
    print(f"{'sum':<16}{total:>14.3f}")
    print()
    print(f"overhead ratio (epoch wall time / bare model passes): {epoch / total:.3f}")


if __name__ == "__main__":
    main()
