"""`lora-grpo sample`: images from a base model with or without a safety adapter, through the stock pipeline."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from lora_grpo.config import ModelConfig
from lora_grpo.errors import UserError
from lora_grpo.models import load_adapter, load_pipeline, pick_device
from lora_grpo.prompts import read_prompt_lines


def read_prompt_file(path: str | Path) -> list[str]:
    prompts = read_prompt_lines(path)
    if not prompts:
        raise UserError(f"prompt file {path} is empty: write one prompt per line")
    return prompts


def generate(
    pipe, prompt: str, seed: int, steps: int, guidance: float, eta: float, adapter_scale: float | None = None
):
    """One image (PIL) from the stock pipeline; the generator lives on the CPU so a seed means the same image anywhere."""
    kwargs = {"cross_attention_kwargs": {"scale": adapter_scale}} if adapter_scale is not None else {}
    result = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=eta,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return result.images[0]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def run_sample(args: argparse.Namespace) -> None:
    prompts = [args.prompt] if args.prompt else read_prompt_file(args.prompts)
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be >= 1")
    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(ModelConfig(base=args.base), dtype=dtype)
    if args.adapter:
        load_adapter(pipe, args.adapter)
    pipe.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    total = len(prompts) * args.num_images
    for i, prompt in enumerate(prompts):
        for k in range(args.num_images):
            seed = args.seed + k
            scale = args.adapter_scale if args.adapter else None
            image = generate(pipe, prompt, seed, args.steps, args.guidance, args.eta, scale)
            name = f"{i:04d}_{k:02d}_{_slug(prompt)}.png"
            image.save(out / name)
            manifest.append(
                {"file": name, "prompt": prompt, "seed": seed, "base": args.base, "adapter": args.adapter}
            )
            print(f"[{len(manifest)}/{total}] {out / name}", flush=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest), encoding="utf-8")
