"""Update objectives by name (`train.objective`). Each module is one objective and owns every term of its
loss, the KL to the reference policy included; update.py batches, accumulates and steps, and never adds a
term itself."""

from __future__ import annotations

from lora_grpo.config import TrainConfig
from lora_grpo.grpo import clipped_policy_loss
from lora_grpo.objectives.awm import AdvantageWeightedMatching
from lora_grpo.objectives.grpo_clip import GrpoClip, Surrogate
from lora_grpo.objectives.nft import NegativeAwareFineTuning
from lora_grpo.objectives.step_batch import Objective, StepBatch

__all__ = [
    "AdvantageWeightedMatching",
    "GrpoClip",
    "NegativeAwareFineTuning",
    "Objective",
    "StepBatch",
    "Surrogate",
    "build_objective",
]


def build_objective(cfg: TrainConfig, surrogate: Surrogate = clipped_policy_loss) -> Objective:
    """The recipe's objective (`surrogate` replaces the clipped loss, a seam for tests)."""
    if cfg.objective == "grpo-clip":
        return GrpoClip(cfg.clip_range, cfg.uses_kl, surrogate)
    if cfg.objective == "awm":
        return AdvantageWeightedMatching(cfg.uses_kl)
    if cfg.objective == "nft":
        return NegativeAwareFineTuning(cfg.nft_beta, cfg.adv_clip_max, cfg.uses_kl)
    raise ValueError(f"unknown objective {cfg.objective}")  # config's Literal keeps this unreachable
