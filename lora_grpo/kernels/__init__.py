"""Stochastic samplers (kernels), one module each: a step x_t -> x_prev is a Gaussian whose mean and std the
kernel computes from the UNet's output, in the DDIM coordinates every kernel shares (x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps, a = alphas_cumprod: the latents the UNet takes as they are). Sampling, the step log-prob
and the update call `step_mean_std` with the schedule's sampler name and know nothing else of it.

    ddim             DDIM with eta (Song et al. 2021): kernels/ddim.py
    euler-ancestral  Euler ancestral (Karras et al. 2022; diffusers' EulerAncestralDiscreteScheduler, the
                     A1111 / ComfyUI "Euler a"): kernels/euler_ancestral.py
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lora_grpo.kernels import ddim, euler_ancestral
from lora_grpo.kernels.prediction import broadcast, predicted_x0_eps

# (x_t, x0_hat, eps_hat, a_t, a_prev, eta) -> (mean, std), all fp32 and broadcast over the latent
Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]

KERNELS: dict[str, Kernel] = {
    "ddim": ddim.step_mean_std,
    "euler-ancestral": euler_ancestral.step_mean_std,
}
# the alpha a schedule's last step goes to: DDIM's scheduler's final_alpha_cumprod, Euler's sigma 0 (a = 1)
ENDS_AT_CLEAN = {"ddim": False, "euler-ancestral": True}


def step_mean_std(
    sampler: str,
    model_output: Tensor,
    sample: Tensor,
    alpha_prod: Tensor,
    alpha_prod_prev: Tensor,
    eta: float,
    prediction_type: str,
) -> tuple[Tensor, Tensor]:
    """Mean and std of `sampler`'s step from `sample` (x_t), in fp32: the UNet's output read as (x0, eps) by
    the prediction type, then the kernel's step. fp32 on purpose: the log-prob ratio of two nearly equal
    policies is exp of a tiny difference, and bf16 rounding of the mean would swamp it."""
    out, x = model_output.float(), sample.float()
    a_t, a_prev = broadcast(alpha_prod, x), broadcast(alpha_prod_prev, x)
    x0, eps = predicted_x0_eps(out, x, a_t, prediction_type)
    return KERNELS[sampler](x, x0, eps, a_t, a_prev, eta)
