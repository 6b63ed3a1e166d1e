"""`lora-grpo toyworld build` and `toyworld variants`: retrain the toy world's models and its fine-tunes."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("toyworld", help="the toy world's models")
    toy = p.add_subparsers(dest="toyworld_command", required=True)
    b = toy.add_parser("build", help="train the toy world's base model and reward CLIP from scratch")
    b.add_argument("out", help="output folder (gets toyworld-sd/ and toyworld-clip/)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--language",
        choices=("plain", "rich"),
        default="plain",
        help="rich: captions also name each colour by synonyms and associations ('a crimson circle', "
        "'a circle the colour of a tomato'); writes toyworld-rich-sd/ and toyworld-rich-clip/",
    )
    b.add_argument(
        "--smoke", action="store_true", help="a few steps per stage (checks the pipeline, not quality)"
    )
    b.set_defaults(func=run)
    v = toy.add_parser(
        "variants",
        help="fine-tune the shipped toy base into the community models of the deployment matrix "
        "(two fine-tunes to train on, one held out, a style LoRA)",
    )
    v.add_argument("out", help="output folder (gets one folder per model and variants.json)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--smoke", action="store_true", help="a few steps each (checks the pipeline, not quality)")
    v.set_defaults(func=run_variants)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.toyworld.build import BuildSettings, build

    settings = BuildSettings(seed=args.seed, language=args.language)
    if args.smoke:
        settings = BuildSettings(
            seed=args.seed,
            vae_steps=3,
            clip_steps=3,
            unet_steps=3,
            unet_pool=64,
            held_out_images=4,
            language=args.language,
        )
    build(args.out, settings, log=lambda line: print(line, flush=True))


def run_variants(args: argparse.Namespace) -> None:
    from lora_grpo.toyworld.variants import VariantSettings, build_variants

    settings = VariantSettings(seed=args.seed)
    if args.smoke:
        settings = VariantSettings(seed=args.seed, steps=2, pool=64, lora_steps=2, check_images=1)
    build_variants(args.out, settings, log=lambda line: print(line, flush=True))
