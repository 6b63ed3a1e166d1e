"""Advantage-weighted matching (AWM; Xue et al., "Advantage Weighted Matching", arXiv:2509.25050): the
ordinary denoising loss on the rollout's own final images, each weighted by its group advantage, so images
better than their group's mean are made more likely and worse ones less. It needs no log-prob of the sampler,
so rollouts may come from any sampler, and the trained timestep is drawn freely (here: the update plan's
steps) with fresh noise:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    loss = mean_b A_b ||f(x_t, t) - target_b||^2 + mean_b w_b ||f(x_t, t) - f_ref(x_t, t)||^2

(squared norms averaged over latent elements; target = the noise, the velocity or x0 by the model's
prediction type; f_ref: the UNet without the adapter). The second term keeps the policy near the base model:
for two Gaussian steps of equal variance the KL is proportional to the squared difference of their means,
which is linear in the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lora_grpo.objectives.step_batch import StepBatch


def per_row_mse(a: Tensor, b: Tensor) -> Tensor:
    """[b, ...] x [b, ...] -> [b]: the mean squared difference of each row, in fp32."""
    return ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class AdvantageWeightedMatching:
    with_kl: bool  # some trajectory has a KL weight > 0: the reference forward runs
    uses_old_predictions: bool = False

    def loss(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        prediction, target = batch.denoise()
        error = per_row_mse(prediction, target)  # [b]
        loss = (batch.advantages * error).mean()
        metrics = {"matching_error": error.mean().detach()}
        if self.with_kl:
            drift = per_row_mse(prediction, batch.denoise_reference())  # [b]
            loss = loss + (batch.kl_weights * drift).mean()
            metrics["kl"] = drift.mean().detach()
        return loss, metrics
