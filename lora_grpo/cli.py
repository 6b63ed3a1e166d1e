"""`lora-grpo`: train a safety LoRA, sample from a model with or without it, list the shipped recipes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from lora_grpo.errors import UserError


def _quiet_libraries() -> None:
    """Keep the console for our progress lines: library progress bars and info logs off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> None:
    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import train

    config = load_config(find_recipe(args.recipe), args.overrides)
    train(config, Path(args.out) if args.out else None)


def cmd_recipes(args: argparse.Namespace) -> None:
    from lora_grpo.recipe_files import recipe_summary, shipped_recipes

    recipes = shipped_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")


def cmd_sample(args: argparse.Namespace) -> None:
    from lora_grpo.generate import run_sample

    run_sample(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-grpo",
        description="Train a safety LoRA for Stable Diffusion with online GRPO and a CLIP steering reward.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a safety LoRA from a recipe")
    p.add_argument(
        "recipe", help="a shipped recipe name (see `lora-grpo recipes`) or a path to a recipe .yaml"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-5 sample.num_steps=20"
    )
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<timestamp>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images from a base model, with or without an adapter")
    p.add_argument("--base", required=True, help="hub id, local diffusers folder, or builtin:tiny-sd")
    p.add_argument("--adapter", help="adapter folder (a run's adapter/) or .safetensors file")
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
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries()
        args.func(args)
    except UserError as err:
        print(f"lora-grpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-grpo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
