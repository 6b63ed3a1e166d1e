"""Before/after evaluation in the toy world with the exact evaluator: a training callback.

Prompt sets (fixed): unsafe = every red composition's full caption; safe = every other colour's; held-out
safe = the safe compositions never seen in pretraining. Each set is sampled `images_per_set` times with fixed
seeds (the same before and after) and read back by `readout`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from lora_grpo.callbacks import RunContext
from lora_grpo.files import write_text_atomically
from lora_grpo.models import adapter_disabled
from lora_grpo.rollout import RolloutModel, sample_scored
from lora_grpo.toyworld.ordering import format_ordering, ordering_prompts, reward_ordering
from lora_grpo.toyworld.readout import readout, score
from lora_grpo.toyworld.world import (
    UNSAFE_COLOUR,
    Composition,
    held_out_compositions,
    safe_compositions,
    unsafe_compositions,
)
from lora_grpo.tracking import save_grid


def prompt_sets() -> dict[str, list[Composition]]:
    """The evaluated sets. held_out_safe: the safe compositions never rendered in pretraining (the held-out red
    ones are in "unsafe", where turning them non-red is the goal, not a loss of accuracy)."""
    held_out_safe = [c for c in held_out_compositions() if c.colour != UNSAFE_COLOUR]
    return {"unsafe": unsafe_compositions(), "safe": safe_compositions(), "held_out_safe": held_out_safe}


def expand(comps: list[Composition], count: int) -> list[Composition]:
    """`count` prompts cycling through `comps` (every composition equally often when count divides)."""
    return [comps[i % len(comps)] for i in range(count)]


def evaluate_model(
    model: RolloutModel, reward_fn, images_per_set: int, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Per set: the scores plus the mean steering reward, and the images."""
    scores, images = {}, {}
    for i, (name, comps) in enumerate(prompt_sets().items()):
        asked = expand(comps, images_per_set)
        imgs, rewards = sample_scored(model, reward_fn, [c.caption for c in asked], seed + 1000 * i)
        scores[name] = {
            **asdict(score(list(zip(asked, readout(imgs), strict=True)))),
            "reward": rewards.float().mean().item(),
        }
        images[name] = imgs
    return scores, images


def _rounded(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {k: round(float(v), 4) for k, v in row.items()} for name, row in scores.items()}


TABLE_ROWS = [
    ("red rate on unsafe prompts", "unsafe", "red_rate"),
    ("position accuracy on unsafe prompts", "unsafe", "position_accuracy"),
    ("colour+position accuracy on safe prompts", "safe", "colour_position_accuracy"),
    ("colour+position accuracy on held-out safe", "held_out_safe", "colour_position_accuracy"),
    ("background clean (unsafe)", "unsafe", "background_clean"),
    ("background clean (safe)", "safe", "background_clean"),
    ("empty images (unsafe)", "unsafe", "empty_rate"),
    ("steering reward (unsafe)", "unsafe", "reward"),
    ("steering reward (safe)", "safe", "reward"),
]


def format_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    lines = [f"{'toy world, exact evaluator':<42}{'before':>9}{'after':>9}"]
    for label, set_name, key in TABLE_ROWS:
        lines.append(f"{label:<42}{before[set_name][key]:>9.3f}{after[set_name][key]:>9.3f}")
    return "\n".join(lines)


class ToyworldSuite:
    """Around training: the reward-ordering check and the base model's scores at the start; the trained
    model's scores, a before/after table, OUT/toyworld_report.json and OUT/toyworld_before_after.png at the end."""

    def __init__(self, images_per_set: int, seed: int):
        self.images_per_set, self.seed = images_per_set, seed
        self.before_scores: dict[str, dict] = {}
        self.before_images: dict[str, torch.Tensor] = {}
        self.ordering = []
        self.report: dict = {}

    def on_start(self, ctx: RunContext) -> None:
        self.ordering = reward_ordering(ctx.reward_fn, ordering_prompts())
        ctx.log(format_ordering(self.ordering, ctx.config.reward.alpha))
        ctx.log(f"evaluating the base model ({self.images_per_set} images per prompt set)...")
        # the adapter off is the base model exactly, also when a resumed run has already trained it
        with adapter_disabled(ctx.model.unet):
            self.before_scores, self.before_images = evaluate_model(
                ctx.model, ctx.reward_fn, self.images_per_set, self.seed
            )

    def on_epoch_end(self, ctx: RunContext, epoch: int, row: dict, grid: Path | None) -> dict:
        return {}

    def on_end(self, ctx: RunContext) -> None:
        ctx.log("evaluating the trained model...")
        after_scores, after_images = evaluate_model(ctx.model, ctx.reward_fn, self.images_per_set, self.seed)
        ctx.log(format_table(self.before_scores, after_scores))
        sample = ctx.config.sample
        self.report = {
            "images_per_set": self.images_per_set,
            "seed": self.seed,
            "sampler": {
                "num_steps": sample.num_steps,
                "eta": sample.eta,
                "guidance_scale": sample.guidance_scale,
            },
            "alpha": ctx.config.reward.alpha,
            "before": _rounded(self.before_scores),
            "after": _rounded(after_scores),
            "reward_ordering": [r.__dict__ for r in self.ordering],
        }
        report_path = ctx.run_dir / "toyworld_report.json"
        write_text_atomically(report_path, json.dumps(self.report, indent=2))
        self._save_grid(ctx.run_dir / "toyworld_before_after.png", after_images)

    def _save_grid(self, path: Path, after_images: dict[str, torch.Tensor]) -> None:
        """The same 4 unsafe and 4 safe prompts and seeds, base row then trained row."""
        n = self.images_per_set
        spread = sorted({round(k * (n - 1) / 3) for k in range(4)})  # 4 images spread over the set
        tiles, captions = [], []
        for label, source in (("base", self.before_images), ("trained", after_images)):
            for set_name in ("unsafe", "safe"):
                comps = expand(prompt_sets()[set_name], n)
                for i in spread:
                    tiles.append(source[set_name][i])
                    captions.append(f"{label}: {comps[i].caption}")
        save_grid(torch.stack(tiles), captions, path, cell=128, columns=8)
