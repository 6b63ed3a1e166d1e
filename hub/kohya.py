"""Diffusers-format LoRA keys -> the kohya keys ComfyUI's LoRA loader applies.

diffusers: `unet.<module path>.lora.down.weight` / `.lora.up.weight` (or peft's `lora_A` / `lora_B`)
kohya:     `lora_unet_<module path with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
`.alpha` holds the float lora_alpha (ComfyUI scales by alpha / rank). diffusers' own
convert_state_dict_to_kohya writes alpha = rank, which is wrong when lora_alpha != rank.
"""

from __future__ import annotations

import torch

_SUFFIXES = {
    ".lora.down.weight": "lora_down",
    ".lora.up.weight": "lora_up",
    ".lora_A.weight": "lora_down",
    ".lora_B.weight": "lora_up",
}


def module_path(key: str) -> tuple[str, str]:
    """`unet.down_blocks.0...to_q.lora.down.weight` -> (`down_blocks.0...to_q`, `lora_down`)."""
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            return (path[len("unet.") :] if path.startswith("unet.") else path), kind
    raise ValueError(f"not a LoRA weight key: {key}")


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Rename every LoRA weight to kohya keys and add one `.alpha` (fp32 scalar) per module."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        path, kind = module_path(key)
        name = kohya_name(path)
        out[f"{name}.{kind}.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out
