"""What an objective sees of one minibatch at one trained denoising step, and the interface it implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class StepBatch:
    """b trajectories of the rollout at one trained step each.

    `policy()` runs the UNet under the current LoRA with gradient and returns (log_prob [b], mean, std) of the
    stored transition x_t -> x_prev; `reference_mean()` runs it with the adapter disabled, without gradient,
    and returns the reference policy's step mean. `denoise()` noises each trajectory's final latent x0 to the
    step's timestep with fresh noise (drawn per trajectory from a keyed generator) and returns the policy's
    prediction there, with gradient, and its target; `denoise_reference()` the reference's prediction at the
    same noised latents; `denoise_old()` the sampling policy's prediction there, no gradient (computed before
    the inner epoch's first optimizer step, for objectives with `uses_old_predictions`). An objective calls
    what its terms need, once each.
    """

    policy: Callable[[], tuple[Tensor, Tensor, Tensor]]
    reference_mean: Callable[[], Tensor]
    old_log_prob: Tensor  # [b] the log-prob recorded while sampling
    advantages: Tensor  # [b]
    kl_weights: Tensor  # [b] each trajectory's weight on the KL to the reference
    denoise: Callable[[], tuple[Tensor, Tensor]] = None  # type: ignore[assignment]
    denoise_reference: Callable[[], Tensor] = None  # type: ignore[assignment]
    denoise_old: Callable[[], Tensor] = None  # type: ignore[assignment]


class Objective(Protocol):
    """An update objective: every term of the loss of one StepBatch. `metrics` are detached scalars named as
    UpdateStats' fields (ratio_mean, clip_fraction, kl, ...), plus `ratios` [b], the importance ratios before
    the first optimizer step (1 to float rounding for an objective on the sampler's own log-probs).
    `uses_old_predictions`: the update computes `denoise_old` for every trained step first."""

    uses_old_predictions: bool

    def loss(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]: ...
