"""Diffusers-format LoRA keys -> the kohya keys ComfyUI's LoRA loader applies.

diffusers: `unet.<module path>.lora.down.weight` / `.lora.up.weight` (or peft's `lora_A` / `lora_B`)
kohya:     `lora_unet_<module path with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
`.alpha` holds the float lora_alpha (ComfyUI scales by alpha / rank). diffusers' own
convert_state_dict_to_kohya writes alpha = rank, which is wrong when lora_alpha != rank.

ComfyUI applies a kohya key only when its module is one its loader maps for the model's architecture and
skips any other key without a word, so a file with one unknown module would load a partly safe adapter.
`unknown_modules` lists the LoRA modules of an SD 1.x or SDXL adapter that are not in that map: the
weight-bearing modules of the published UNet (the family's shipped config, built on the meta device) of the
kinds the loader maps: in attention blocks proj_in, proj_out and the group norm; in transformer blocks the
three norms, to_q, to_k, to_v and to_out.0 of attn1 and attn2, ff.net.0.proj and ff.net.2; in resnets the two
norms and convolutions, time_emb_proj and conv_shortcut; the down- and upsamplers' conv; conv_in,
conv_norm_out, conv_out, the time embedding and SDXL's added embedding.
"""

from __future__ import annotations

import re
from functools import cache

import torch

from lora_grpo.errors import UserError

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


_KNOWN = re.compile(
    r"^(conv_in|conv_norm_out|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]"
    r"|(down_blocks|up_blocks)\.\d+\.(downsamplers|upsamplers)\.0\.conv"
    r"|(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+\."
    r"(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)"
    r"|(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.(proj_in|proj_out|norm"
    r"|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj"
    r"|ff\.net\.2)))$"
)
CHECKED_FAMILIES = ("sd1", "sdxl")  # families with one published UNet layout ComfyUI knows


@cache
def comfyui_modules(family: str) -> frozenset[str]:
    """The module paths (diffusers names) ComfyUI's LoRA loader maps for `family` ("sd1" or "sdxl")."""
    from diffusers import UNet2DConditionModel

    from lora_grpo.families import config_folder

    config = UNet2DConditionModel.load_config(config_folder(family) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return frozenset(
        name
        for name, module in unet.named_modules()
        if _KNOWN.match(name) and getattr(module, "weight", None) is not None
    )


def unknown_modules(state_dict_keys, family: str) -> list[str]:
    """The LoRA modules among `state_dict_keys` that ComfyUI would skip for `family`; [] for a family
    without one published layout (custom UNets: nothing to check against)."""
    if family not in CHECKED_FAMILIES:
        return []
    known = comfyui_modules(family)
    return sorted({module_path(k)[0] for k in state_dict_keys} - known)


def check_comfyui_coverage(state_dict_keys, family: str) -> None:
    """Refuse a ComfyUI file that would load only part of the adapter, naming the modules it would skip."""
    unknown = unknown_modules(state_dict_keys, family)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(
            f"the adapter has {len(unknown)} LoRA module(s) that ComfyUI's loader does not map for {family} "
            f"and would skip without a word ({shown}): the ComfyUI file would be only partly safe, so nothing "
            f"was exported; train with lora.target_modules inside the attention layers "
            f"(to_q, to_k, to_v, to_out.0) of a standard {family} UNet"
        )
