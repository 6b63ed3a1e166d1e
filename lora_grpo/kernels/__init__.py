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

# (model_output, x_t, alpha_prod, alpha_prod_prev, eta, prediction_type) -> (mean, std), fp32
StepMeanStd = Callable[[Tensor, Tensor, Tensor, Tensor, float, str], tuple[Tensor, Tensor]]

KERNELS: dict[str, StepMeanStd] = {
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
    """Mean and std of `sampler`'s step from `sample` (x_t), in fp32."""
    return KERNELS[sampler](model_output, sample, alpha_prod, alpha_prod_prev, eta, prediction_type)
