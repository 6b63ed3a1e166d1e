"""The flags that name a model and an adapter, shared by the commands that load one (sample, eval)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--base (required), --adapter, --config."""
    p.add_argument(
        "--base",
        required=True,
        help="hub id, local diffusers folder, single-file .safetensors checkpoint, or builtin:tiny-sd",
    )
    p.add_argument("--adapter", help="adapter folder (a run's adapter/) or .safetensors file")
    p.add_argument("--config", help="single-file --base only: a diffusers folder whose configs fit it")
