"""Negative-aware fine-tuning (after DiffusionNFT; Zheng et al., "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process", arXiv:2509.16117): the advantage-weighted denoising loss of awm.py made
bounded. Each rollout's final image x0 is noised afresh at the trained step (as in awm) and the policy's
prediction f is mixed with the sampling policy's prediction f_old at the same input into an implicit positive
and an implicit negative policy:

    f+ = (1 - beta) f_old + beta f          f- = (1 + beta) f_old - beta f
    r  = (1 + clip(A / A_max, -1, 1)) / 2   (the advantage as a probability of being the better image)
    loss = mean_b [ r_b ||f+ - target_b||^2 + (1 - r_b) ||f- - target_b||^2 ] + mean_b w_b ||f - f_ref||^2

(squared norms averaged over latent elements; target: the noise, velocity or x0 by the prediction type;
f_ref: the UNet without the adapter, with a KL weight). At f = f_old the gradient is awm's, scaled by
2 beta (2 r - 1) / A; unlike awm's, the loss is a convex quadratic in f with its minimum at
f = f_old + (2 r - 1) (target - f_old) / beta: a worse-than-average image pushes the prediction a bounded
way from itself instead of without end, so the update cannot climb the denoising error of the images it
rejects. A_max = train.adv_clip_max; beta = train.nft_beta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lora_grpo.objectives.awm import per_row_mse
from lora_grpo.objectives.step_batch import StepBatch


def optimality(advantages: Tensor, adv_max: float) -> Tensor:
    """[b] advantages -> [b] r in [0, 1]: 1/2 for an average image, 1 (0) at +A_max (-A_max) and beyond."""
    return (1.0 + torch.clamp(advantages / adv_max, -1.0, 1.0)) / 2.0


def nft_loss(prediction: Tensor, old: Tensor, target: Tensor, r: Tensor, beta: float) -> Tensor:
    """[b] the per-row loss r ||f+ - t||^2 + (1 - r) ||f- - t||^2 (means over elements, fp32)."""
    prediction, old = prediction.float(), old.float()
    positive = (1.0 - beta) * old + beta * prediction
    negative = (1.0 + beta) * old - beta * prediction
    return r * per_row_mse(positive, target) + (1.0 - r) * per_row_mse(negative, target)


@dataclass(frozen=True)
class NegativeAwareFineTuning:
    beta: float
    adv_max: float
    with_kl: bool  # some trajectory has a KL weight > 0: the reference forward runs
    uses_old_predictions: bool = True  # the update computes f_old before its first optimizer step

    def loss(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        prediction, target = batch.denoise()
        r = optimality(batch.advantages, self.adv_max)
        loss = nft_loss(prediction, batch.denoise_old(), target, r, self.beta).mean()
        metrics = {"matching_error": per_row_mse(prediction, target).mean().detach()}
        if self.with_kl:
            drift = per_row_mse(prediction, batch.denoise_reference())  # [b]
            loss = loss + (batch.kl_weights * drift).mean()
            metrics["kl"] = drift.mean().detach()
        return loss, metrics
