"""`lora-grpo export`: a publishable folder (lora_grpo.hub.export)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a publishable folder: diffusers + ComfyUI files, model card, recipe"
    )
    p.add_argument(
        "src", nargs="?", help="a run directory (with adapter/ and config.yaml) or an adapter folder"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="adapter name (default: the recipe name)")
    p.add_argument("--repo", help="the Hub repo id used in the card's usage snippet (user/name)")
    p.add_argument("--license", default="creativeml-openrail-m", help="license in the card and metadata")
    p.add_argument(
        "--fused", action="store_true", help="also write fused/: the base pipeline with the adapter merged"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out whole (none of its files stay)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="RUN/checkpoints/epoch_N",
        help="export this complete checkpoint (of a run that may still be training) instead of SRC",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.hub.export import export

    export(
        args.src,
        args.out,
        name=args.name,
        repo_id=args.repo,
        license=args.license,
        fused=args.fused,
        overwrite=args.overwrite,
        checkpoint=args.checkpoint,
    )
