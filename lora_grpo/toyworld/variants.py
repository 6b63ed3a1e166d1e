"""`lora-grpo toyworld variants OUT`: the community models a safety adapter meets where it is used, made from
the shipped toy base the way people make them:

  toyworld-sd-outline, toyworld-sd-small   full fine-tunes to train a robust adapter on (`model.bases`)
  toyworld-sd-shaded                       a third fine-tune, kept for evaluation only (never trained on)
  toyworld-style-blurred                   a style LoRA trained on the base (stacked under the adapter)

Each continues the base's own denoising training on pictures of its style (styles.py) with the base's captions
and red-caption noise, so it still draws red for red prompts. The fine-tunes' UNets are stored in fp16 (they
load into float32 pipelines unchanged); their other components are the base's.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lora_grpo.toyworld.build import (
    CaptionCache,
    LatentPool,
    denoising_loss,
    draw_timesteps,
    training_compositions,
)

FINE_TUNES = {"toyworld-sd-outline": "outline", "toyworld-sd-small": "small", "toyworld-sd-shaded": "shaded"}
TRAINING_BASES = ("builtin:toyworld-sd-outline", "builtin:toyworld-sd-small")
HELD_OUT_BASE = "builtin:toyworld-sd-shaded"
STYLE_LORA = "toyworld-style-blurred"
STYLE_LORA_STYLE = "blurred"
CAPTION_DROPOUT = 0.1  # as in pretraining, so classifier-free guidance keeps working
WARMUP_STEPS = 50  # Adam's first steps at the full rate knock a trained toy UNet off its colours


@dataclass
class VariantSettings:
    seed: int = 0
    steps: int = 300  # fine-tune steps (pretraining took 2000)
    batch: int = 64
    lr: float = 2e-4
    pool: int = 8192  # styled pictures encoded once per variant
    high_noise_share: float = 0.5
    lora_steps: int = 400
    lora_rank: int = 8
    lora_lr: float = 3e-3
    check_images: int = 2  # images per composition for the recorded red rate and accuracy


def train_denoising(
    unet,
    params,
    pool: LatentPool,
    encode,
    scheduler,
    settings: VariantSettings,
    steps: int,
    lr: float,
    rng,
    log,
    what: str,
) -> None:
    """`steps` AdamW steps of the base's denoising loss on `pool`, training `params` in place."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    started = time.perf_counter()
    for step in range(1, steps + 1):
        latents, captions = pool.draw(rng, settings.batch)
        captions = ["" if rng.random() < CAPTION_DROPOUT else c for c in captions]
        t = draw_timesteps(
            rng, len(captions), settings.high_noise_share, scheduler.config.num_train_timesteps
        )
        loss = denoising_loss(unet, scheduler, latents, encode(captions), t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % max(1, steps // 5) == 0:
            log(f"  {what} step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s")


def style_scores(pipe, images_per_composition: int, seed: int = 0) -> dict[str, float]:
    """The model's red rate on red prompts and colour+position accuracy on the others (the toyworld recipe's
    sampler, the exact evaluator)."""
    from lora_grpo.toyworld.build import EVAL_SAMPLER
    from lora_grpo.toyworld.readout import readout, score
    from lora_grpo.toyworld.world import UNSAFE_COLOUR, all_compositions

    comps = all_compositions() * images_per_composition
    readings = []
    for b in range(0, len(comps), 90):
        out = pipe(
            [c.caption for c in comps[b : b + 90]],
            generator=torch.Generator().manual_seed(seed + b),
            output_type="pt",
            **EVAL_SAMPLER,
        ).images
        readings += readout(out)
    pairs = list(zip(comps, readings, strict=True))
    unsafe = score([p for p in pairs if p[0].colour == UNSAFE_COLOUR])
    safe = score([p for p in pairs if p[0].colour != UNSAFE_COLOUR])
    return {"red_rate": unsafe.red_rate, "safe_colour_position": safe.colour_position_accuracy}


def _fresh_pipeline(base_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        base_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fine_tune(base_dir: Path, out: Path, style: str, settings: VariantSettings, index: int, log) -> dict:
    """A full UNet fine-tune on `style`, written as a pipeline folder (the base's other components)."""
    torch.manual_seed(settings.seed + 100 + index)
    rng = np.random.default_rng([settings.seed, 100 + index])
    pipe = _fresh_pipeline(base_dir)
    pool = LatentPool(pipe.vae, rng, settings.pool, training_compositions(), style=style)
    unet = pipe.unet.train().requires_grad_(True)
    encode = CaptionCache(pipe.text_encoder, pipe.tokenizer)
    train_denoising(
        unet,
        list(unet.parameters()),
        pool,
        encode,
        pipe.scheduler,
        settings,
        settings.steps,
        settings.lr,
        rng,
        log,
        style,
    )
    unet.eval().requires_grad_(False)
    scores = style_scores(pipe, settings.check_images)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp)
    shutil.rmtree(tmp / "unet")
    unet.to(torch.float16).save_pretrained(tmp / "unet")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return scores


def style_lora(base_dir: Path, out: Path, settings: VariantSettings, log) -> dict:
    """A LoRA on the base trained on the style LoRA's pictures, saved as a diffusers LoRA file."""
    from lora_grpo.config import LoraSettings
    from lora_grpo.models import add_lora, save_adapter

    torch.manual_seed(settings.seed + 200)
    rng = np.random.default_rng([settings.seed, 200])
    pipe = _fresh_pipeline(base_dir)
    pool = LatentPool(pipe.vae, rng, settings.pool, training_compositions(), style=STYLE_LORA_STYLE)
    pipe.unet.requires_grad_(False)
    params = add_lora(pipe.unet, LoraSettings(rank=settings.lora_rank, alpha=float(settings.lora_rank)))
    encode = CaptionCache(pipe.text_encoder, pipe.tokenizer)
    pipe.unet.train()
    train_denoising(
        pipe.unet,
        params,
        pool,
        encode,
        pipe.scheduler,
        settings,
        settings.lora_steps,
        settings.lora_lr,
        rng,
        log,
        "style LoRA",
    )
    pipe.unet.eval()
    scores = style_scores(pipe, settings.check_images)
    save_adapter(pipe.unet, out, base_model="builtin:toyworld-sd")
    return scores


def build_variants(
    out_dir: str | Path, settings: VariantSettings | None = None, log: Callable[[str], None] = print
) -> dict:
    """Write OUT/<fine-tune>/ for each of FINE_TUNES, OUT/toyworld-style-blurred/ and OUT/variants.json (each
    model's red rate and safe accuracy next to the base's)."""
    from lora_grpo.tiny import resolve_builtin

    settings = settings or VariantSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_builtin("toyworld-sd")
    started = time.perf_counter()
    record = {
        "settings": asdict(settings),
        "scores": {"toyworld-sd": style_scores(_fresh_pipeline(base_dir), settings.check_images)},
    }
    for index, (name, style) in enumerate(FINE_TUNES.items()):
        log(f"fine-tune {name} ({style})")
        record["scores"][name] = fine_tune(base_dir, out_dir / name, style, settings, index, log)
        log(f"  {name}: {record['scores'][name]}")
    log(f"style LoRA {STYLE_LORA} ({STYLE_LORA_STYLE})")
    record["scores"][STYLE_LORA] = style_lora(base_dir, out_dir / STYLE_LORA, settings, log)
    log(f"  {STYLE_LORA}: {record['scores'][STYLE_LORA]}")
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "variants.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record
