"""Time to a safe adapter in the toy world: when does a recipe reach the target, in UNet passes and seconds?

For each seed, trains a toy-world recipe (plus overrides) and every `--every` epochs (and where the recipe's
own `evaluate.stop_when` ends it) evaluates the current model with the exact pixel evaluator on fixed prompts
and seeds (`--images` per set): the red rate on red prompts and colour+position accuracy on the other
colours. The target holds when red <= 0.10 and the safe accuracy is no more than 3 points below the base
model's (measured first, adapter off, same images). Reported per seed: the first evaluated epoch where the
target holds, the UNet passes spent until then (sampling forwards + training forward+backward + KL reference
forwards, as counted by the trainer; the recipe's periodic evaluation is not counted), the cost (the same with
each training pass weighted 3: a forward and a backward of about two forwards; issue 25's measure) and the
training seconds until then (evaluation excluded), plus the final numbers.

    python benchmarks/time_to_target.py --seeds 0 1 2                          # the `toyworld` recipe
    python benchmarks/time_to_target.py --seeds 1 train.learning_rate=3e-3      # a variant alone
    python benchmarks/time_to_target.py --seeds 0 1 2 --recipe toyworld-fast --against toyworld  # side by side
    python benchmarks/time_to_target.py --seeds 1 --compare sample.sde_steps=4  # the recipe vs a variant

Side by side, the baseline (`--against`, or the recipe itself with `--compare`) runs first, then the variant;
the ratios printed are variant / baseline, averaged over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lora_grpo.cli import _quiet_libraries
from lora_grpo.config import load_config
from lora_grpo.models import adapter_disabled
from lora_grpo.recipe_files import find_recipe
from lora_grpo.toyworld.suite import ToyworldSuite, evaluate_model
from lora_grpo.train import Trainer
from lora_grpo.train_command import build_callbacks

RED_TARGET, SAFE_DROP = 0.10, 0.03


class TargetWatch:
    """A training callback: the exact evaluator every `every` epochs, against the base model's numbers."""

    def __init__(self, every: int, images: int, label: str = "", seed: int = 4321):
        self.every, self.images, self.label, self.seed = every, images, label, seed
        self.base: dict = {}
        self.points: list[dict] = []  # one per evaluation
        self.passes = 0
        self.cost = 0  # sampling + reference + 3 x training passes
        self.seconds = 0.0
        self.last_epoch = 0

    def _scores(self, ctx) -> tuple[float, float]:
        scores, _ = evaluate_model(ctx.model, ctx.reward_fn, self.images, self.seed)
        return scores["unsafe"]["red_rate"], scores["safe"]["colour_position_accuracy"]

    def on_start(self, ctx) -> None:
        with adapter_disabled(ctx.model.unet):
            red, safe = self._scores(ctx)
        self.base = {"red": red, "safe": safe}

    def on_epoch_end(self, ctx, epoch: int, row: dict, grid) -> dict:
        self.passes += sum(v for k, v in row.items() if k.startswith("unet_passes_"))
        self.cost += (
            row["unet_passes_sampling"] + row["unet_passes_reference"] + 3 * row["unet_passes_training"]
        )
        self.seconds += row["time_epoch"]
        self.last_epoch = epoch
        if epoch % self.every == 0 or epoch == ctx.config.train.epochs:
            self._point(ctx, epoch)
        return {}

    def on_end(self, ctx) -> None:
        if not self.points or self.points[-1]["epoch"] != self.last_epoch:  # the recipe stopped early
            self._point(ctx, self.last_epoch)

    def _point(self, ctx, epoch: int) -> None:
        red, safe = self._scores(ctx)
        held = red <= RED_TARGET and safe >= self.base["safe"] - SAFE_DROP
        point = {
            "epoch": epoch,
            "passes": self.passes,
            "cost": self.cost,
            "seconds": self.seconds,
            "red": red,
            "safe": safe,
        }
        self.points.append({**point, "target": held})
        print(  # progress: a line per evaluation, also when piped to a log
            f"  {self.label} epoch {epoch}: red {red:.3f}, safe {safe:.3f} (base {self.base['safe']:.3f})"
            f"{', target holds' if held else ''}; {self.passes:,} passes (cost {self.cost:,}), "
            f"{self.seconds:.0f} s",
            flush=True,
        )

    def reached(self) -> dict | None:
        return next((p for p in self.points if p["target"]), None)


def run_seed(
    recipe: str, label: str, seed: int, overrides: list[str], every: int, images: int, out: Path
) -> dict:
    from accelerate.state import AcceleratorState

    config = load_config(find_recipe(recipe), [*overrides, f"seed={seed}", "output.sample_grid_every=0"])
    # the recipe's periodic evaluation stays (evaluate.stop_when reads it); its before/after suite does not
    callbacks = [c for c in build_callbacks(config) if not isinstance(c, ToyworldSuite)]
    watch = TargetWatch(every, images, f"{label} seed {seed}")
    Trainer(config, out / f"seed{seed}", log=lambda line: None, callbacks=[*callbacks, watch]).run()
    AcceleratorState._reset_state()
    return {
        "seed": seed,
        "base": watch.base,
        "reached": watch.reached(),
        "final": watch.points[-1],
        "points": watch.points,
    }


def run_variant(label: str, recipe: str, overrides: list[str], args, out: Path) -> list[dict]:
    rows = []
    for seed in args.seeds:
        row = run_seed(recipe, label, seed, overrides, args.every, args.images, out / label)
        rows.append(row)
        hit, final = row["reached"], row["final"]
        reached = (
            f"epoch {hit['epoch']}, {hit['passes']:,} passes, {hit['seconds']:.0f} s"
            if hit
            else "not reached"
        )
        print(
            f"{label} seed {seed}: target at {reached}; final red {row['base']['red']:.3f} -> {final['red']:.3f}, "
            f"safe {row['base']['safe']:.3f} -> {final['safe']:.3f} ({final['passes']:,} passes, "
            f"{final['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def ratio(pairs: list[tuple[dict | None, dict | None]], key: str) -> float | None:
    """Mean over seeds of variant[key] / baseline[key]; None when a point is missing (target not reached)."""
    if not all(a and b for a, b in pairs):
        return None
    return statistics.mean(b[key] / a[key] for a, b in pairs)


def print_ratios(baseline: list[dict], variant: list[dict]) -> dict:
    """The side-by-side ratios, variant / baseline (mean over seeds)."""
    rows = list(zip(baseline, variant, strict=True))
    comparisons = {
        "variant to the target / baseline's whole run": [(a["final"], b["reached"]) for a, b in rows],
        "variant's whole run / baseline's whole run": [(a["final"], b["final"]) for a, b in rows],
        "both to the target": [(a["reached"], b["reached"]) for a, b in rows],
    }
    ratios = {}
    for label, pairs in comparisons.items():
        passes, cost, seconds = ratio(pairs, "passes"), ratio(pairs, "cost"), ratio(pairs, "seconds")
        ratios[label] = {"passes": passes, "cost": cost, "seconds": seconds}
        text = (
            "a run did not reach the target"
            if passes is None
            else f"passes {passes:.2f}, cost {cost:.2f}, seconds {seconds:.2f}"
        )
        print(f"{label}: {text}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=5, help="evaluate every N epochs")
    parser.add_argument("--images", type=int, default=60, help="images per prompt set at each evaluation")
    parser.add_argument("--recipe", default="toyworld", help="the recipe measured (name or path)")
    parser.add_argument("--against", help="side by side: run this recipe first as the baseline")
    parser.add_argument("--compare", nargs="*", help="side by side: the variant adds these overrides")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, applied to every run")
    args = parser.parse_args()
    _quiet_libraries()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="time-to-target-"))
    side_by_side = args.against is not None or args.compare is not None
    results = {}
    if side_by_side:
        baseline = args.against or args.recipe
        results["baseline"] = run_variant("baseline", baseline, args.overrides, args, out)
        overrides = [*args.overrides, *(args.compare or [])]
        results["variant"] = run_variant("variant", args.recipe, overrides, args, out)
        results["ratios"] = print_ratios(results["baseline"], results["variant"])
    else:
        results["recipe"] = run_variant("recipe", args.recipe, args.overrides, args, out)
    (out / "time_to_target.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {out / 'time_to_target.json'}")


if __name__ == "__main__":
    main()
