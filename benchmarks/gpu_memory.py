"""Peak GPU memory and seconds per epoch: full fine-tune + AdamW vs LoRA + 8-bit AdamW + checkpointing.

Builds Stable Diffusion 1.5-sized components from configs (random weights, nothing downloaded): the
860M-parameter UNet, the SD VAE, a CLIP ViT-L/14 text encoder with the full BPE vocabulary, and a
ViT-L/14-sized reward CLIP. Then runs a few GRPO epochs at 512 px with the `sd15-nudity-compact` recipe's
settings (G 16, 50 steps, CFG 5, train batch 4, bf16), scaled down to one prompt group per epoch:

  lora  the product: LoRA on the attention layers, bf16 frozen base, 8-bit AdamW, gradient checkpointing
  full  the reference setup: the whole UNet trained in fp32 with bf16 autocast and torch AdamW, no checkpointing
  lora-nockpt  (optional) the product without gradient checkpointing

`--size sdxl` does the same with SDXL base 1.0-sized components at 1024 px and the `sdxl-nudity-compact`
recipe's settings (G 8, 30 steps, train batch 1, both text encoders on the CPU).

    python benchmarks/gpu_memory.py                      # on a GPU
    python benchmarks/gpu_memory.py --size sdxl --setups lora   # SDXL-sized, the product only
    python benchmarks/gpu_memory.py --size tiny          # the same code path on tiny models (CPU smoke test)
    python benchmarks/gpu_memory.py --size tiny-sdxl     # and on a tiny SDXL-family model
    python benchmarks/gpu_memory.py --setups lora --attention classic --compile --bare   # speed settings

`--attention classic` swaps diffusers' default SDPA attention for its plain processor, `--compile` runs the
UNet under torch.compile, `--bare` also times the epoch's model passes alone (epoch_breakdown.py) and prints
the epoch / bare-passes ratio. benchmarks/gpu_check.sh runs the prepared set of these on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from epoch_breakdown import bare_pass_seconds  # benchmarks/ is on sys.path when run as a script

from lora_grpo.cli import _quiet_libraries
from lora_grpo.config import load_config
from lora_grpo.families import FAMILIES, config_folder
from lora_grpo.recipe_files import find_recipe, shipped_recipe_dir
from lora_grpo.tiny import (
    build_tiny_clip,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
    sd_ddim_scheduler,
)
from lora_grpo.train import Trainer


def build_full_sized(family: str, out_dir: Path, device: str) -> Path:
    """A pipeline folder with the published architecture of `family` (sd1: SD 1.5, sdxl: SDXL base 1.0; the
    configs lora_grpo ships for single-file checkpoints) and random weights, stored in fp16."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec, configs = FAMILIES[family], config_folder(family)
    encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes on the CPU
        parts = {
            "unet": UNet2DConditionModel.from_config(spec["unet"]),
            "vae": AutoencoderKL.from_config(spec["vae"]),
        }
        for name, cls in encoders.items():
            if name in spec:
                parts[name] = cls(CLIPTextConfig.from_pretrained(configs / name))
    parts = {name: module.half() for name, module in parts.items()}
    for name in spec["tokenizers"]:
        parts[name] = CLIPTokenizer.from_pretrained(configs / name)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(scheduler=sd_ddim_scheduler(), **parts)
    else:
        pipe = StableDiffusionPipeline(
            scheduler=sd_ddim_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipe.save_pretrained(out_dir / family)
    return out_dir / family


def build_vit_l_clip(out_dir: Path, device: str) -> None:
    """A transformers CLIPModel folder shaped like openai/clip-vit-large-patch14 (random weights)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    config = CLIPConfig(
        text_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        projection_dim=768,
    )
    with torch.device(device):
        model = CLIPModel(config)
    model.half().save_pretrained(out_dir / "clip")
    CLIPTokenizer.from_pretrained(config_folder("sd1") / "tokenizer").save_pretrained(out_dir / "clip")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        out_dir / "clip"
    )


def full_unet(unet, _lora_settings) -> list[torch.nn.Parameter]:
    """The reference setup: every UNet weight trains, in fp32."""
    unet.float().requires_grad_(True)
    return list(unet.parameters())


def apply_speed_settings(unet: torch.nn.Module, attention: str, compile_unet: bool) -> None:
    """`attention` "classic": diffusers' plain attention processor instead of its default, PyTorch's fused
    scaled_dot_product_attention (SDPA); `compile_unet`: torch.compile the UNet in place (the trainer and the
    pass counter keep the same module object)."""
    if attention == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if compile_unet:
        unet.compile()


def run_setup(
    name: str, recipe: str, overrides: list[str], epochs: int, device: torch.device, speed: dict
) -> dict:
    prompts = shipped_recipe_dir() / "prompts"
    overrides = [
        *overrides,
        f"train.epochs={epochs}",
        "sample.prompts_per_batch=1",
        "sample.batches_per_epoch=1",
        "train.gradient_accumulation_steps=4",
        "output.sample_grid_every=0",
        # local prompt files: nothing from the hub
        f"prompts.sets=[{{name: unsafe, safety: unsafe, path: {prompts / 'tiny_unsafe.txt'}}}, "
        f"{{name: safe, safety: safe, path: {prompts / 'safe_captions.txt'}}}]",
    ]
    if name == "full":
        # no adapter to switch off, so no reference pass: the full setup drops the recipe's KL / drift penalty
        overrides += ["train.optimizer=adamw", "train.gradient_checkpointing=false", "train.safe_kl_coef=0"]
    if name == "lora-nockpt":  # the product without gradient checkpointing: what checkpointing costs
        overrides += ["train.gradient_checkpointing=false"]
    config = load_config(find_recipe(recipe), overrides)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"trainable": full_unet} if name == "full" else {}
        trainer = Trainer(config, Path(tmp), log=lambda line: None, **kwargs)
        apply_speed_settings(trainer.model.unet, speed["attention"], speed["compile"])
        trainable = sum(p.numel() for p in trainer.learner.params)
        loaded = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        times, rows = [], []
        for epoch in range(epochs):
            start = time.perf_counter()
            rows.append(trainer.run_epoch(epoch))
            times.append(time.perf_counter() - start)
        bare = sum(bare_pass_seconds(trainer, repeats=3).values()) if speed["bare"] else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del trainer
    return {
        "setup": name,
        "trainable": trainable,
        "peak_gib": peak,
        "loaded_gib": loaded,
        "sec_per_epoch": statistics.mean(times[1:] if len(times) > 1 else times),
        "bare_s": bare,
        "sampling": rows[-1].get("time_sampling", 0.0),
        "train": rows[-1].get("time_train", 0.0),
        "samples": config.samples_per_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["sd15", "sdxl", "tiny", "tiny-sdxl"], default="sd15")
    parser.add_argument("--setups", default="full,lora", help="comma-separated: full, lora, lora-nockpt")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setup (the first is a warm-up)")
    parser.add_argument(
        "--attention", choices=["sdpa", "classic"], default="sdpa", help="the UNet's attention processor"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--bare", action="store_true", help="also time the epoch's model passes bare: epoch / bare ratio"
    )
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for both setups")
    args = parser.parse_args()
    speed = {"attention": args.attention, "compile": args.compile, "bare": args.bare}
    _quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        xl = args.size in ("sdxl", "tiny-sdxl")
        recipe = "sdxl-nudity-compact" if xl else "sd15-nudity-compact"
        if args.size in ("sd15", "sdxl"):
            base = build_full_sized("sdxl" if xl else "sd1", tmp, device.type)
            build_vit_l_clip(tmp, device.type)
            clip, extra = tmp / "clip", []
        else:
            builder = build_tiny_sdxl_pipeline if xl else build_tiny_pipeline
            base, clip = builder(tmp / "base"), build_tiny_clip(tmp / "clip")
            extra = [
                "sample.num_steps=4",
                "sample.sde_steps=2",
                "sample.resolution=32",
                "train.mixed_precision=no",
            ]
        print(f"built {args.size}-sized models in {time.perf_counter() - start:.0f}s on {device}", flush=True)
        overrides = [f"model.base={base}", f"reward.clip.model={clip}", *extra, *args.overrides]
        setups = args.setups.split(",")
        results = [run_setup(name, recipe, overrides, args.epochs, device, speed) for name in setups]

    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {card}  attention {args.attention}  compile {'on' if args.compile else 'off'}")
    print(
        f"{'setup':<12}{'trainable params':>18}{'loaded GiB':>12}{'peak GiB':>10}{'s/epoch':>9}"
        f"{'sampling s':>12}{'train s':>9}{'samples/epoch':>15}"
    )
    for r in results:
        print(
            f"{r['setup']:<12}{r['trainable']:>18,}{r['loaded_gib']:>12.2f}{r['peak_gib']:>10.2f}"
            f"{r['sec_per_epoch']:>9.1f}{r['sampling']:>12.1f}{r['train']:>9.1f}{r['samples']:>15}"
        )
        if args.bare:
            ratio = r["sec_per_epoch"] / r["bare_s"]
            print(f"  {r['setup']}: epoch / bare model passes = {ratio:.2f} ({r['bare_s']:.1f} s bare)")
    by_name = {r["setup"]: r for r in results}
    if "full" in by_name and "lora" in by_name:
        full, lora = by_name["full"], by_name["lora"]
        print(f"memory ratio full/lora: {full['peak_gib'] / lora['peak_gib']:.2f}")
        print(f"time ratio full/lora: {full['sec_per_epoch'] / lora['sec_per_epoch']:.2f}")


if __name__ == "__main__":
    main()
