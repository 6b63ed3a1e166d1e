"""SafeDiffusion-R1's objective (arXiv:2605.18719, Sec. 3.3): the PPO-clipped surrogate on the ratio of the
step's Gaussian log-probs under the current and the sampling policy, with group-normalised advantages, plus
each trajectory's weight times the closed-form KL of its step to the reference policy (the UNet without the
adapter; train.kl_coef, train.safe_kl_coef):

    loss = mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps)) + mean_b w_b KL(N(mu_b, s^2) || N(mu_ref_b, s^2))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_grpo.grpo import clipped_policy_loss, gaussian_kl
from lora_grpo.objectives.step_batch import StepBatch

# the surrogate: (log_probs, old_log_probs, advantages, clip_range) -> (loss, metrics); a seam for tests
Surrogate = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class GrpoClip:
    clip_range: float
    with_kl: bool  # some trajectory has a KL weight > 0: the reference forward runs
    surrogate: Surrogate = clipped_policy_loss
    uses_old_predictions: bool = False

    def loss(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        log_prob, mean, std = batch.policy()
        loss, metrics = self.surrogate(log_prob, batch.old_log_prob, batch.advantages, self.clip_range)
        metrics = {**metrics, "ratios": torch.exp(log_prob.detach() - batch.old_log_prob)}  # [b]
        if self.with_kl:
            kl = gaussian_kl(mean, std, batch.reference_mean(), std)  # [b]
            loss = loss + (batch.kl_weights * kl).mean()
            metrics["kl"] = kl.mean().detach()
        return loss, metrics
