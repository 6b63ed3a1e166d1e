"""`lora-grpo toyworld build`: retrain the toy world's models."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("toyworld", help="the toy world's models")
    toy = p.add_subparsers(dest="toyworld_command", required=True)
    b = toy.add_parser("build", help="train the toy world's base model and reward CLIP from scratch")
    b.add_argument("out", help="output folder (gets toyworld-sd/ and toyworld-clip/)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--smoke", action="store_true", help="a few steps per stage (checks the pipeline, not quality)"
    )
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.toyworld.build import BuildSettings, build

    settings = BuildSettings(seed=args.seed)
    if args.smoke:
        settings = BuildSettings(
            seed=args.seed, vae_steps=3, clip_steps=3, unet_steps=3, unet_pool=64, held_out_images=4
        )
    build(args.out, settings, log=lambda line: print(line, flush=True))
