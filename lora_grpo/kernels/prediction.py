"""What every kernel reads from the UNet's output: the predicted clean latent x0 and noise eps at x_t."""

from __future__ import annotations

import torch
from torch import Tensor


def broadcast(x: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars [N] (or a 0-d tensor) over the latent dims of `like`, fp32."""
    x = x.to(device=like.device, dtype=torch.float32)
    return x.reshape(-1, *([1] * (like.ndim - 1))) if x.ndim else x


def predicted_x0_eps(out: Tensor, x: Tensor, a_t: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the UNet output `out` at x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (all fp32, a_t
    broadcast): epsilon, v (v = sqrt(a) eps - sqrt(1 - a) x0) or the sample itself."""
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction_type}")
    return x0, eps
