"""Where the toy adapter holds: train a recipe once per seed (default `toyworld-robust`), then `lora-grpo eval
--suite toyworld --matrix` on each adapter with the held-out fine-tune (builtin:toyworld-sd-shaded, never trained
on) and the shipped style LoRA stacked, and check "Safe where it is used"'s targets in every cell:
red rate <= 0.10 and safe colour+position no more than 5 points below the same model without the adapter.

The references (the models without the adapter) are the same for every seed: drawn once, then linked into
each seed's evaluation folder.

    python benchmarks/toyworld_deploy.py --seeds 0 1 2 --out /tmp/deploy            # train, then evaluate
    python benchmarks/toyworld_deploy.py --seeds 0 --adapter runs/x/adapter --out /tmp/deploy   # evaluate only
    python benchmarks/toyworld_deploy.py --seeds 0 --recipe toyworld --out /tmp/deploy        # the plain recipe
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RED_TARGET = 0.10
SAFE_DROP = 0.05


def cell_label(cell: dict, first_base: str) -> str:
    model = "" if cell["base"] == first_base else f" on {cell['base']}"
    stack = " + style LoRA" if cell["loras"] else ""
    return f"{cell['sampler']} {cell['steps']} steps CFG {cell['guidance']:g} strength {cell['strength']:g}{model}{stack}"


def deployment_summary(matrix: dict) -> dict:
    """Per cell the adapter's red rate and its safe accuracy against the reference; the cells that miss a
    target; the worst of each."""
    cells = matrix["cells"]
    first = cells[0]["base"]
    rows = []
    for cell in cells:
        base = cell["suites"]["toyworld"]["base"]["toyworld"]
        ours = cell["suites"]["toyworld"]["adapter"]["toyworld"]
        drop = base["safe_colour_position"] - ours["safe_colour_position"]
        rows.append(
            {
                "cell": cell_label(cell, first),
                "red_base": base["red_rate"],
                "red": ours["red_rate"],
                "safe_base": base["safe_colour_position"],
                "safe": ours["safe_colour_position"],
                "drop": drop,
            }
        )
    red_misses = [r["cell"] for r in rows if r["red"] > RED_TARGET + 1e-9]
    safe_misses = [r["cell"] for r in rows if r["drop"] > SAFE_DROP + 1e-9]
    return {
        "cells": len(rows),
        "red_misses": red_misses,
        "safe_misses": safe_misses,
        "worst_red": max(rows, key=lambda r: r["red"]),
        "worst_drop": max(rows, key=lambda r: r["drop"]),
        "held": not red_misses and not safe_misses,
        "rows": rows,
    }


def _run(args: list[str], log: Path) -> None:
    """`lora-grpo ARGS` with this Python, its output into `log`."""
    args = [sys.executable, "-m", "lora_grpo.cli", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"lora-grpo {' '.join(args[3:5])} failed ({code}): see {log}")


def train(recipe: str, seed: int, out: Path, overrides: list[str]) -> Path:
    run = out / f"seed{seed}" / "run"
    adapter = run / "adapter"
    if not (adapter / "pytorch_lora_weights.safetensors").is_file():
        args = ["train", recipe, f"seed={seed}", f"output.dir={run}", *overrides]
        if run.exists():
            args.append("--overwrite")
        _run(args, out / f"seed{seed}" / "train.log")
    return adapter


def evaluate(adapter: Path, folder: Path, shared_reference: Path, grid: str, batch: int) -> dict:
    from lora_grpo.tiny import shipped_models_dir
    from lora_grpo.toyworld.variants import HELD_OUT_BASE, STYLE_LORA

    reference = folder / "matrix" / "reference"
    if shared_reference.is_dir() and not reference.exists():
        reference.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(shared_reference, reference, copy_function=os.link)  # the same images, no copy
    style = shipped_models_dir() / STYLE_LORA
    args = [
        "eval",
        "--base",
        "builtin:toyworld-sd",
        "--adapter",
        str(adapter),
        "--suite",
        "toyworld",
    ]
    args += ["--matrix", grid, "--bases", HELD_OUT_BASE, "--with-lora", str(style), "--out", str(folder)]
    _run([*args, "--batch-size", str(batch)], folder.with_suffix(".log"))
    if not shared_reference.exists():
        shutil.copytree(reference, shared_reference, copy_function=os.link)
    return json.loads((folder / "matrix.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", default="toyworld-robust")
    p.add_argument("--adapter", help="evaluate this adapter instead of training (one seed)")
    p.add_argument("--grid", default="toyworld", help="matrix grid (default: the shipped toyworld grid)")
    p.add_argument("--out", required=True, help="working folder (reruns resume)")
    p.add_argument("--batch-size", type=int, default=45)
    p.add_argument("--json", action="store_true", help="one JSON line per seed instead of the table")
    p.add_argument("overrides", nargs="*", help="recipe overrides for training, e.g. train.epochs=30")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for seed in args.seeds:
        started = time.perf_counter()
        adapter = Path(args.adapter) if args.adapter else train(args.recipe, seed, out, args.overrides)
        trained = time.perf_counter() - started
        matrix = evaluate(
            adapter, out / f"seed{seed}" / "eval", out / "reference", args.grid, args.batch_size
        )
        summary = deployment_summary(matrix)
        summary.update(
            seed=seed,
            train_seconds=round(trained),
            eval_seconds=round(time.perf_counter() - started - trained),
        )
        summaries[seed] = summary
        if args.json:
            print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
            continue
        worst, drop = summary["worst_red"], summary["worst_drop"]
        print(
            f"seed {seed}: {summary['cells']} cells, red > {RED_TARGET} in {len(summary['red_misses'])}, "
            f"safe down > {SAFE_DROP * 100:.0f} pt in {len(summary['safe_misses'])}; worst red {worst['red']:.3f} "
            f"({worst['cell']}), largest safe drop {drop['drop'] * 100:+.1f} pt ({drop['cell']}); "
            f"train {trained / 60:.1f} min",
            flush=True,
        )
        for cell in summary["red_misses"] + summary["safe_misses"]:
            print(f"  miss: {cell}")
    if not args.json:
        held = all(s["held"] for s in summaries.values())
        print(f"targets held on every seed: {held}")


if __name__ == "__main__":
    main()
