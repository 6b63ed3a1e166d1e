"""The reward-ordering check: does the steering reward, on rendered ground truth, prefer a non-red colour for
red prompts and each safe prompt's own colour? Run before training (`lora-grpo check-reward toyworld`, the
toy-world suite, the build)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lora_grpo.toyworld.world import (
    COLOURS,
    UNSAFE_COLOUR,
    Composition,
    render,
    safe_compositions,
    unsafe_compositions,
)


def ordering_prompts() -> list[Composition]:
    """The prompts of the reward-ordering check: four red compositions and one of each safe colour, spread
    over shapes and places."""
    return unsafe_compositions()[::4] + safe_compositions()[::16]


@dataclass
class OrderingRow:
    prompt: str
    safety: str
    rewards: dict[str, float]  # candidate colour -> mean reward of rendered images
    problem: str | None


def reward_ordering(
    reward_fn, prompt_comps: list[Composition], renders: int = 4, seed: int = 0
) -> list[OrderingRow]:
    """For each prompt, the reward of rendered ground truth in every colour (same shape and place).

    Flags an unsafe prompt whose best colour is still red (alpha too small to steer), and a safe prompt whose
    best colour is not its own (steering moves it off its content).
    """
    rows = []
    rng = np.random.default_rng(seed)
    for comp in prompt_comps:
        images, labels = [], []
        for colour, rgb in COLOURS.items():
            for _ in range(renders):
                images.append(render(rgb, comp.shape, comp.position, rng))
                labels.append(colour)
        rewards = reward_fn(torch.stack(images), [comp.caption] * len(images)).float().cpu()
        means = {c: rewards[[i for i, lab in enumerate(labels) if lab == c]].mean().item() for c in COLOURS}
        best = max(means, key=means.get)
        safety = "unsafe" if comp.colour == UNSAFE_COLOUR else "safe"
        problem = None
        if safety == "unsafe" and best == UNSAFE_COLOUR:
            problem = "this unsafe prompt still prefers red: raise reward.alpha"
        if safety == "safe" and best != comp.colour:
            problem = f"this safe prompt prefers {best} over its own colour: lower reward.alpha"
        rows.append(OrderingRow(comp.caption, safety, means, problem))
    return rows


def format_ordering(rows: list[OrderingRow], alpha: float) -> str:
    colours = list(COLOURS)
    lines = [f"reward-ordering check at alpha {alpha}: mean reward of rendered ground truth per colour"]
    lines.append(f"{'prompt':<34}" + "".join(f"{c:>8}" for c in colours))
    for row in rows:
        best = max(row.rewards, key=row.rewards.get)
        cells = "".join(f"{row.rewards[c]:>7.3f}{'*' if c == best else ' '}" for c in colours)
        lines.append(f"{row.prompt:<34}{cells}")
    problems = [r for r in rows if r.problem]
    for r in problems:
        lines.append(f"WARNING: '{r.prompt}': {r.problem}")
    if not problems:
        lines.append("ok: every unsafe prompt prefers a non-red colour and every safe prompt its own colour")
    return "\n".join(lines)
