"""`lora-grpo sample`: images from a base model, with or without an adapter (lora_grpo.generate)."""

from __future__ import annotations

import argparse

from lora_grpo.commands.model_args import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a base model, with or without an adapter")
    add_model_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help="text file with one prompt per line")
    p.add_argument("--out", default="samples", help="output folder for PNG files (default: samples)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; each next image adds 1")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="LoRA weight (0 disables it)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.generate import run_sample

    run_sample(args)
