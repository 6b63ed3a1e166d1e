"""Each batch row at its own LoRA strength: the strength slider of deployment, inside one forward.

peft adds a LoRA layer's update as `lora_B(lora_A(x)) * scaling`; a forward hook on every `lora_B` multiplies
that update by the row's strength, so row r computes W x + s_r * (alpha / rank) B A x, what a user gets with
the adapter loaded at strength s_r. Under classifier-free guidance the UNet sees [uncond; cond] (the rows
twice, in order), so the strengths repeat to the batch the layer sees.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def lora_up_modules(unet) -> list[torch.nn.Module]:
    """Every LoRA `lora_B` projection of the active adapter (peft keeps them in ModuleDicts by adapter name)."""
    found = []
    for name, module in unet.named_modules():
        if name.endswith(".lora_B") and isinstance(module, torch.nn.ModuleDict):
            found += list(module.values())
    return found


def _row_factor(scale: Tensor, out: Tensor) -> Tensor:
    rows = scale.shape[0]
    if out.shape[0] % rows:
        raise RuntimeError(f"a LoRA layer saw {out.shape[0]} rows, not a multiple of the {rows} scaled rows")
    factor = scale.to(device=out.device, dtype=out.dtype).repeat(out.shape[0] // rows)
    return factor.view(-1, *([1] * (out.ndim - 1)))


@contextlib.contextmanager
def row_scaled(unet, scale: Tensor | None):
    """Within the block, row r of every UNet forward (and its backward, gradient checkpointing's recompute
    included) runs the LoRA at strength scale[r]; scale None: no change."""
    if scale is None:
        yield
        return
    handles = [
        m.register_forward_hook(lambda _m, _inp, out: out * _row_factor(scale, out))
        for m in lora_up_modules(unet)
    ]
    if not handles:
        raise RuntimeError("row_scaled: the UNet has no LoRA layers")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
