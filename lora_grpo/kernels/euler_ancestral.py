"""The Euler ancestral step (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", the ancestral sampler of k-diffusion; diffusers' EulerAncestralDiscreteScheduler, "Euler a" in
A1111 and ComfyUI), written in the DDIM coordinates the other kernels use.

In Euler's coordinates x_e = x0 + sigma eps, with sigma = sqrt((1 - a) / a) and x_e = x / sqrt(a). One step
from sigma to sigma_next splits sigma_next^2 into fresh noise sigma_up^2 and a deterministic part:

    sigma_up   = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)   (at most sigma_next)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x_e_prev   = x_e + eps_hat (sigma_down - sigma) + sigma_up z

so x_prev = sqrt(a_prev) x_e_prev is Gaussian with mean sqrt(a_prev) (x_e + eps_hat (sigma_down - sigma)) and
std sqrt(a_prev) sigma_up. eta 1 is diffusers' scheduler; eta 0 the plain Euler step. The last step goes to
sigma 0 (a_prev = 1) and has no noise: it is deterministic at any eta.
"""

from __future__ import annotations

from torch import Tensor


def step_mean_std(
    x: Tensor, x0: Tensor, eps: Tensor, a_t: Tensor, a_prev: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Euler ancestral step x_t -> x_prev (DDIM coordinates) from the predicted eps
    (kernels.step_mean_std; x0 is implied: Euler's derivative (x_e - x0) / sigma is eps)."""
    sigma = ((1 - a_t) / a_t).sqrt()
    sigma_next = ((1 - a_prev) / a_prev).sqrt()
    sigma_up = (eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()).minimum(sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    mean = a_prev.sqrt() * (x / a_t.sqrt() + eps * (sigma_down - sigma))
    return mean, a_prev.sqrt() * sigma_up
