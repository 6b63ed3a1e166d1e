"""Time per adapter for the SD recipes: an ESTIMATE from measured GPU seconds per UNet pass times the recipes'
counted work. No GPU is needed to run it; its inputs are a `gpu_memory.py` measurement.

`gpu_memory.py` on an H200 (benchmarks/RESULTS.md, 2026-11-27) timed one group of 16 samples at SD 1.5 size,
512 px: 50 sampling steps and 20 trained steps per sample, CFG (2 UNet rows per image and step), train batch
4, LoRA r16, 8-bit AdamW, bf16. That gives seconds per UNet row-pass:

    sampling: sampling_s / (16 * 50 * 2)        training (forward + backward): train_s / (16 * 20 * 2)

with and without gradient checkpointing. A recipe's epoch is then `epoch_work(recipe)` (the same arithmetic
the trainer's counted passes are tested against) priced at those rates, on a card `--slowdown` times slower
than the H200, with checkpointing as `train.gradient_checkpointing: auto` decides for `--card-gib`.

    python benchmarks/time_per_adapter.py                       # the shipped SD recipes, 24 GB card
    python benchmarks/time_per_adapter.py --slowdown 6 --card-gib 24
    python benchmarks/time_per_adapter.py --set sample.sde_steps=0 --set sample.tail_steps=0   # other settings
    python benchmarks/time_per_adapter.py --json sd15-nudity-compact   # one JSON line a recipe
"""

from __future__ import annotations

import argparse
import json

from lora_grpo.config import load_config
from lora_grpo.policy import SD15_LATENT, SD15_UNET_PARAMS, checkpointing_choice
from lora_grpo.recipe_files import find_recipe
from lora_grpo.tracking import epoch_work

# benchmarks/RESULTS.md, gpu_memory.py on one H200, one group of 16: (sampling s, train s, loaded GiB)
MEASURED = {"checkpointing": (6.5, 29.1), "no checkpointing": (6.4, 16.9)}
LOADED_GIB = 3.68
MEASURED_SAMPLING_ROWS = 16 * 50 * 2
MEASURED_TRAINING_ROWS = 16 * 20 * 2
RECIPES = ["sd15-nudity-compact", "sd14-nudity-compact", "sd14-nudity-scaled"]


def seconds_per_pass(mode: str) -> tuple[float, float]:
    """(sampling, training) H200 seconds per UNet row-pass at SD 1.5 size, 512 px."""
    sampling_s, train_s = MEASURED[mode]
    return sampling_s / MEASURED_SAMPLING_ROWS, train_s / MEASURED_TRAINING_ROWS


REFERENCE_SHARE = 1 / 3  # a forward without gradient / a forward + backward (the backward ~ 2 forwards)


def epoch_seconds(work: dict[str, int], checkpointing: bool) -> float:
    """H200 seconds of one epoch: every counted pass at its measured rate. A reference pass (the KL's base
    UNet, nft's sampling-policy prediction) is a training-sized forward without gradient: a third of a
    training pass (REFERENCE_SHARE; no checkpointing recompute, since nothing is kept for a backward)."""
    sampling, training = seconds_per_pass("checkpointing" if checkpointing else "no checkpointing")
    reference = seconds_per_pass("no checkpointing")[1] * REFERENCE_SHARE
    return (
        work["sampling_passes"] * sampling
        + work["training_passes"] * training
        + work["reference_passes"] * reference
    )


def checkpointing_on(config, card_gib: float) -> bool:
    """What the trainer picks for `train.gradient_checkpointing` on a card of `card_gib`, models loaded."""
    free = int((card_gib - LOADED_GIB) * 2**30)
    return checkpointing_choice(config, SD15_UNET_PARAMS, SD15_LATENT, free)


def estimate(name: str, overrides: list[str], slowdown: float, card_gib: float) -> dict:
    """One recipe's epoch, priced: its counted passes, checkpointing choice and seconds on the card."""
    config = load_config(find_recipe(name), overrides)
    work = epoch_work(config)
    ckpt = checkpointing_on(config, card_gib)
    h200 = epoch_seconds(work, ckpt)
    card = h200 * slowdown
    return {
        "recipe": name,
        "work": work,
        "checkpointing": ckpt,
        "h200_s_per_epoch": h200,
        "s_per_epoch": card,
        "samples_per_epoch": config.samples_per_epoch,
        "epochs": config.train.epochs,
        "hours": card * config.train.epochs / 3600,
    }


def table_row(e: dict) -> str:
    work = e["work"]
    passes = f"{work['sampling_passes']:,} + {work['training_passes']:,} + {work['reference_passes']:,}"
    return (
        f"| {e['recipe']} | {passes} | {'on' if e['checkpointing'] else 'off'} | {e['h200_s_per_epoch']:.0f} "
        f"| {e['s_per_epoch']:.0f} | {e['samples_per_epoch']} | {e['epochs']} | {e['hours']:.1f} |"
    )


def json_line(e: dict, card_gib: float) -> str:
    """The --json line: the card's memory names the seconds' key (s_per_epoch_24gb on the default card)."""
    return json.dumps(
        {
            "recipe": e["recipe"],
            f"s_per_epoch_{card_gib:g}gb": round(e["s_per_epoch"], 1),
            "samples_per_epoch": e["samples_per_epoch"],
            "hours": round(e["hours"], 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slowdown", type=float, default=4.0, help="the card's time / the H200's time")
    parser.add_argument("--card-gib", type=float, default=24.0, help="the card's memory")
    parser.add_argument("--json", action="store_true", help="one JSON line a recipe instead of the table")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override, for every recipe (repeat it)",
    )
    parser.add_argument("recipes", nargs="*", default=RECIPES)
    args = parser.parse_args()
    estimates = [estimate(name, args.set, args.slowdown, args.card_gib) for name in args.recipes]
    if args.json:
        for e in estimates:
            print(json_line(e, args.card_gib))
        return
    print(
        f"| recipe | UNet passes / epoch (sampling + training + reference) | checkpointing on a {args.card_gib:g} GB card "
        f"| H200 s/epoch | {args.card_gib:g} GB card s/epoch (x{args.slowdown:g}) | samples / epoch | epochs "
        f"| hours (estimate) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for e in estimates:
        print(table_row(e))


if __name__ == "__main__":
    main()
