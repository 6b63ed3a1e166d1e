"""The stochastic DDIM step (Song et al. 2021, eq. 12): x_t -> x_prev is a Gaussian with

    mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps_hat,
    std  = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)),

a = alphas_cumprod. fp32 on purpose: the log-prob ratio of two nearly equal policies is exp of a tiny
difference, and bf16 rounding of the mean would swamp it.
"""

from __future__ import annotations

from torch import Tensor

from lora_grpo.kernels.prediction import broadcast, predicted_x0_eps


def step_mean_std(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod: Tensor,
    alpha_prod_prev: Tensor,
    eta: float,
    prediction_type: str,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDIM step x_t -> x_prev, in fp32."""
    out, x = model_output.float(), sample.float()
    a_t, a_prev = broadcast(alpha_prod, x), broadcast(alpha_prod_prev, x)
    x0, eps = predicted_x0_eps(out, x, a_t, prediction_type)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std
