"""`lora-grpo sample`: images from a base model with or without a safety adapter, through the stock pipeline."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from lora_grpo.config import ModelConfig
from lora_grpo.errors import UserError
from lora_grpo.models import adapter_weights_file, load_adapter, load_pipeline, pick_device
from lora_grpo.prompts import read_prompt_lines
from lora_grpo.runs import check_writable_folder


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


def check_sample_args(args: argparse.Namespace) -> None:
    """Numbers a user types that would give garbage images or a traceback: one line each."""
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be >= 1")
    for flag, value in (
        ("--adapter-scale", args.adapter_scale),
        ("--guidance", args.guidance),
        ("--eta", args.eta),
    ):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be in [0, 1] (0: deterministic DDIM), got {args.eta}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")


def run_sample(args: argparse.Namespace) -> None:
    prompts = [args.prompt] if args.prompt else read_prompt_file(args.prompts)
    check_sample_args(args)
    out = Path(args.out)
    check_writable_folder(out, "--out folder")
    names = [f"{i:04d}_{k:02d}_{_slug(p)}.png" for i, p in enumerate(prompts) for k in range(args.num_images)]
    existing = [n for n in names if (out / n).exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"--out folder {out} already holds {len(existing)} of these images ({existing[0]}): choose another "
            "folder or pass --overwrite to replace them"
        )
    if args.adapter:
        adapter_weights_file(args.adapter)
    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(ModelConfig(base=args.base, config=args.config), dtype=dtype)
    if args.adapter:
        load_adapter(pipe, args.adapter)
    pipe.to(device)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    scale = args.adapter_scale if args.adapter else None
    settings = {"steps": args.steps, "guidance": args.guidance, "eta": args.eta, "adapter_scale": scale}
    for prompt in prompts:
        for k in range(args.num_images):
            seed = args.seed + k
            image = generate(pipe, prompt, seed, args.steps, args.guidance, args.eta, scale)
            name = names[len(manifest)]
            image.save(out / name)
            row = {"file": name, "prompt": prompt, "seed": seed, **settings}
            manifest.append({**row, "base": args.base, "adapter": args.adapter})
            print(f"[{len(manifest)}/{len(names)}] {out / name}", flush=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest), encoding="utf-8")
