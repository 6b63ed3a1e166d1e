"""`lora-grpo train RECIPE`: the parser; the checks and the run are lora_grpo.train_command's."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a safety LoRA from a recipe",
        description="Train a safety LoRA from a recipe. Every recipe key is documented, one comment per "
        "field, in lora_grpo/config.py (the README's Recipes section shows a whole recipe); "
        "`lora-grpo recipes show NAME` prints a shipped recipe to copy and edit.",
    )
    p.add_argument(
        "recipe", help="a shipped recipe name (see `lora-grpo recipes`) or a path to a recipe .yaml"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-5 sample.num_steps=20"
    )
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<timestamp>); must be new or empty")
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from a checkpoint: auto = the newest complete one of the run of this recipe created "
        "last under ./runs (or of --out), PATH = a run folder or RUN/checkpoints/epoch_N",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out first and start again")
    p.add_argument(
        "--change-settings",
        action="store_true",
        help="with --resume: train on with overrides of settings other than the epoch cap and the logging, "
        "checkpoint and evaluation cadence (applied to the optimizer too; recorded in run.json)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe, paths and output folder, print the resolved config and the work per epoch, "
        "load nothing",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.train_command import run_train

    run_train(args)
