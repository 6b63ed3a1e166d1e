"""The stochastic DDIM step (Song et al. 2021, eq. 12): x_t -> x_prev is a Gaussian with

    mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps_hat,
    std  = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)),

a = alphas_cumprod.
"""

from __future__ import annotations

from torch import Tensor


def step_mean_std(
    x: Tensor, x0: Tensor, eps: Tensor, a_t: Tensor, a_prev: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDIM step x_t -> x_prev from the predicted x0 and eps (kernels.step_mean_std)."""
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std
