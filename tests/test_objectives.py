"""Update objectives, checked by hand: every term of the loss, from numbers written out here."""

from __future__ import annotations

import math

import pytest
import torch

from lora_grpo.config import TrainConfig
from lora_grpo.objectives import GrpoClip, StepBatch, build_objective


def _batch(log_prob, old, adv, mean, ref_mean, std, weights, calls):
    def policy():
        calls.append("policy")
        return torch.tensor(log_prob), torch.tensor(mean), torch.tensor(std)

    def reference_mean():
        calls.append("reference")
        return torch.tensor(ref_mean)

    return StepBatch(policy, reference_mean, torch.tensor(old), torch.tensor(adv), torch.tensor(weights))


def test_grpo_clip_is_the_clipped_surrogate_plus_the_weighted_kl():
    """Two trajectories, latents of two elements. By hand:
    ratios r = exp(0.1) = 1.10517, exp(-0.2) = 0.81873; eps 0.05 clips them to 1.05 and 0.95.
    row 1 (A = 1):  max(-1.10517, -1.05) = -1.05
    row 2 (A = -1): max(0.81873, 0.95) = 0.95          -> surrogate = mean = -0.05
    KL per element with equal std s: (mu - mu_ref)^2 / (2 s^2); row 1: s = 0.5, diffs 0.1 and 0.3 ->
    (0.01 + 0.09) / 2 / (2 * 0.25) = 0.1; row 2: s = 1, diffs 0 and 0.2 -> (0 + 0.04) / 2 / 2 = 0.01.
    Weights 0.5 and 2: mean(0.5 * 0.1, 2 * 0.01) = 0.035. Loss = -0.05 + 0.035 = -0.015."""
    calls = []
    batch = _batch(
        [0.1, -0.2], [0.0, 0.0], [1.0, -1.0],
        mean=[[1.0, 2.0], [0.0, 0.5]], ref_mean=[[0.9, 1.7], [0.0, 0.3]], std=[[0.5, 0.5], [1.0, 1.0]],
        weights=[0.5, 2.0], calls=calls,
    )  # fmt: skip
    loss, metrics = GrpoClip(clip_range=0.05, with_kl=True).loss(batch)
    assert loss.item() == pytest.approx(-0.015, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx((0.1 + 0.01) / 2, abs=1e-6)
    assert metrics["ratios"].tolist() == pytest.approx([math.exp(0.1), math.exp(-0.2)])
    assert metrics["clip_fraction"].item() == 1.0 and calls == ["policy", "reference"]


def test_grpo_clip_without_kl_runs_no_reference_pass_and_starts_at_ratio_one():
    calls = []
    batch = _batch(
        [0.3, 0.3], [0.3, 0.3], [2.0, -2.0], [[0.0]] * 2, [[9.0]] * 2, [[1.0]] * 2, [1.0, 1.0], calls
    )
    loss, metrics = GrpoClip(clip_range=1e-4, with_kl=False).loss(batch)
    assert loss.item() == 0.0  # ratio exactly 1: -A averages to zero over the group
    assert metrics["ratios"].tolist() == [1.0, 1.0] and "kl" not in metrics and calls == ["policy"]


def test_the_recipe_names_the_objective():
    objective = build_objective(TrainConfig(clip_range=0.02, kl_coef=0.0, safe_kl_coef=0.3))
    assert objective == GrpoClip(clip_range=0.02, with_kl=True)
