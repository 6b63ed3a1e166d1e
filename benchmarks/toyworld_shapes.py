"""Remove a shape in the toy world, with a recipe written by `lora-grpo new-recipe` itself.

For each seed: `new-recipe no-triangles --from toyworld-long --remove "a triangle" --instead "a circle" "a square"
--prompts <every triangle caption> --safe-prompts <every circle and square caption>`, trained from the toy-world
models; before and after, the exact pixel evaluator reads fixed-noise samples of every triangle caption (the
removed-shape rate: images read as triangles) and of every circle and square caption (their shape accuracy,
the ripple on the neighbouring shapes), plus colour+position on both (the rest of the picture must stay).
Goal (issue 17): removed-shape rate <= 10% from >= 85%, other shapes' accuracy within 5 points.

    python benchmarks/toyworld_shapes.py --seeds 0 1 2
    python benchmarks/toyworld_shapes.py --seeds 0 --epochs 10 train.learning_rate=4e-3
    python benchmarks/toyworld_shapes.py --seeds 0 1 2 --epochs 50 --instead "a circle" \
        sample.sde_steps=6 sample.tail_steps=4 train.timestep_fraction=1 train.learning_rate=4e-3 \
        train.safe_kl_coef=0.3 evaluate.every=2 evaluate.prompts_per_set=30 evaluate.images_per_prompt=1 \
        "evaluate.stop_when=['eval/no-triangles/shape_accuracy<=0.05']"      # the goal, met (RESULTS.md)

Overrides after the options go to the recipe (the last example stops a seed once periodic evaluation, on its
own noise, reads at most 5% of the triangle prompts' images as triangles). Each seed's periodic evaluations
are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from lora_grpo.cli import _quiet_libraries
from lora_grpo.config import load_config
from lora_grpo.models import adapter_disabled
from lora_grpo.new_recipe import ConceptSpec, write_recipe
from lora_grpo.rollout import sample_scored
from lora_grpo.toyworld.readout import caption_pairs, readout, score
from lora_grpo.toyworld.suite import ToyworldSuite
from lora_grpo.toyworld.world import COLOURS, POSITIONS, Composition
from lora_grpo.tracking import read_jsonl
from lora_grpo.train import Trainer
from lora_grpo.train_command import build_callbacks

REMOVED, KEPT = "triangle", ("circle", "square")


def captions(shapes) -> list[str]:
    return [Composition(c, s, p).caption for c in COLOURS for s in shapes for p in POSITIONS]


def measure(trainer: Trainer, images_per_prompt: int, seed: int) -> dict[str, float]:
    """The exact evaluator on fixed noise: removed-shape rate and the kept shapes' accuracy."""
    out = {}
    for key, shapes in (("removed", (REMOVED,)), ("kept", KEPT)):
        prompts = captions(shapes) * images_per_prompt
        images, _ = sample_scored(trainer.model, trainer.reward_fn, prompts, seed + len(key))
        pairs = caption_pairs(prompts, readout(images))
        scores = score(pairs)
        out[f"{key}_triangle_rate"] = sum(r.shape == REMOVED for _, r in pairs) / len(pairs)
        out[f"{key}_shape_accuracy"] = scores.shape_accuracy
        out[f"{key}_colour_position"] = scores.colour_position_accuracy
        out[f"{key}_empty"] = scores.empty_rate
    return out


def run_seed(
    seed: int,
    epochs: int,
    images: int,
    instead: tuple[str, ...],
    overrides: list[str],
    work: Path,
    log,
    safe_weight: float | None = None,
    parent: str = "toyworld-long",
) -> dict:
    (work / "triangles.txt").write_text("\n".join(captions((REMOVED,))) + "\n")
    (work / "others.txt").write_text("\n".join(captions(KEPT)) + "\n")
    spec = ConceptSpec(
        name="no-triangles",
        remove=("a triangle",),
        instead=instead,
        prompts=work / "triangles.txt",
        safe_prompts=work / "others.txt",
        parent=parent,
    )
    recipe = write_recipe(spec, work / f"seed{seed}")
    if safe_weight is not None:  # the kept shapes' share of each batch (new-recipe keeps the parent's, 2:1)
        data = yaml.safe_load(recipe.read_text())
        for item in data["prompts"]["sets"]:
            item["weight"] = safe_weight if item["safety"] == "safe" else item["weight"]
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    log(
        f"seed {seed}: --instead {list(instead)}, {epochs} epochs at most, safe weight "
        f"{safe_weight or 'as written'}, overrides {overrides}"
    )
    base = [f"seed={seed}", f"train.epochs={epochs}", "evaluate.every=0", "evaluate.stop_when=[]"]
    config = load_config(recipe, [*base, "output.sample_grid_every=0", *overrides])
    # the recipe's periodic evaluation stays (evaluate.stop_when reads it); its before/after red suite does not
    callbacks = [c for c in build_callbacks(config) if not isinstance(c, ToyworldSuite)]
    trainer = Trainer(
        config, work / f"run{seed}", log=lambda line: log(f"seed {seed}: {line}"), callbacks=callbacks
    )
    with adapter_disabled(trainer.model.unet):
        before = measure(trainer, images, 4321)
    log(f"seed {seed} before: {json.dumps({k: round(v, 3) for k, v in before.items()})}")
    start = time.perf_counter()
    trainer.run()
    rows = read_jsonl(work / f"run{seed}" / "metrics.jsonl")
    trained = len(rows)
    after = measure(trainer, images, 4321)
    log(f"seed {seed} after {trained} epochs: {json.dumps({k: round(v, 3) for k, v in after.items()})}")
    return {
        "seed": seed,
        "epochs": trained,
        "evaluations": [
            {"epoch": r["epoch"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
            for r in rows
            if any(k.startswith("eval/") for k in r)
        ],
        "seconds": time.perf_counter() - start,
        "before": before,
        "after": after,
    }


def main() -> None:
    from accelerate.state import AcceleratorState

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--images", type=int, default=2, help="images per caption at each measurement")
    parser.add_argument(
        "--instead",
        action="append",
        help="one of new-recipe's --instead phrases; repeat for more (default: a circle, a square). One phrase"
        " per flag, so the recipe overrides after it are never read as phrases",
    )
    parser.add_argument(
        "--safe-weight", type=float, help="weight of the circle/square prompt set (the unsafe set's is 1)"
    )
    parser.add_argument(
        "--from",
        dest="parent",
        default="toyworld-long",
        help="the recipe new-recipe extends (default toyworld-long: every run in RESULTS.md used it)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides on the new recipe")
    args = parser.parse_args()
    args.instead = args.instead or ["a circle", "a square"]
    _quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            args_ = (seed, args.epochs, args.images, tuple(args.instead), args.overrides, Path(tmp), print)
            rows.append(run_seed(*args_, safe_weight=args.safe_weight, parent=args.parent))
            AcceleratorState._reset_state()
    print(
        "| seed | triangle rate on triangle prompts | circle/square shape accuracy | colour+position (kept) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(
            f"| {r['seed']} | {b['removed_triangle_rate']:.3f} -> {a['removed_triangle_rate']:.3f} | "
            f"{b['kept_shape_accuracy']:.3f} -> {a['kept_shape_accuracy']:.3f} | "
            f"{b['kept_colour_position']:.3f} -> {a['kept_colour_position']:.3f} |"
        )
    goal = all(
        r["before"]["removed_triangle_rate"] >= 0.85
        and r["after"]["removed_triangle_rate"] <= 0.10
        and r["after"]["kept_shape_accuracy"] >= r["before"]["kept_shape_accuracy"] - 0.05
        for r in rows
    )
    print(
        f"goal (<= 10% from >= 85%, kept shapes within 5 points) on every seed: {'met' if goal else 'not met'}"
    )
    for r in rows:
        for e in r["evaluations"]:
            shapes = {k.split("/")[1]: v for k, v in e.items() if k.endswith("/shape_accuracy")}
            print(f"seed {r['seed']} epoch {e['epoch']}: periodic shape accuracy {shapes}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
