"""Write a diffusers pipeline as one original-layout (LDM / CompVis) checkpoint, the file people download for
ComfyUI and A1111, so single-file loading is tested on tiny models offline.

diffusers ships only the other direction (LDM -> diffusers, used by `from_single_file`); this is the inverse,
written here, and `test_single_file.py` checks it by a round trip through diffusers' own converters.
Layouts (stable-diffusion / generative-models repositories):
  model.diffusion_model.*     the UNet (input_blocks / middle_block / output_blocks; SDXL adds label_emb)
  first_stage_model.*         the VAE (encoder.down.i.block.j, mid.block_1 / attn_1, decoder.up reversed)
  cond_stage_model.transformer.*          SD 1.x: the CLIP text encoder in transformers' own key names
  conditioner.embedders.0.transformer.*   SDXL: the first text encoder (CLIP ViT-L, transformers names)
  conditioner.embedders.1.model.*         SDXL: the second (OpenCLIP ViT-bigG names, fused q/k/v)
"""

from __future__ import annotations

import torch

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET[name]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` keys."""
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    has_attention = {
        int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        module, leaf = ".".join(parts[:-1]), parts[-1]
        if module in fixed:
            new = f"{fixed[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{i * per_down + j + 1}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{i * per_down + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(i + 1) * per_down}.0.op.{leaf}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{i * per_up + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * per_up + j}.1.{rest}"
            else:  # upsamplers.0.conv: after the resnet (and the attention, when the level has one)
                slot = 2 if i in has_attention else 1
                new = f"output_blocks.{i * per_up + layers_per_block}.{slot}.conv.{leaf}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> `first_stage_model.*` keys (attention projections as 1x1 convs)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i, kind, rest = parts[2], parts[3], ".".join(parts[5:])
            new = f"{parts[0]}.down.{i}." + (
                f"block.{parts[4]}.{rest}" if kind == "resnets" else f"downsample.{rest}"
            )
        elif parts[1] == "up_blocks":
            i, kind, rest = levels - 1 - int(parts[2]), parts[3], ".".join(parts[5:])
            new = f"{parts[0]}.up.{i}." + (
                f"block.{parts[4]}.{rest}" if kind == "resnets" else f"upsample.{rest}"
            )
        elif parts[1] == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{parts[0]}.mid.block_{j + 1}.{rest}"
            else:
                module, leaf = rest.rsplit(".", 1)
                new = f"{parts[0]}.mid.attn_1.{VAE_ATTENTION[module]}.{leaf}"
                if leaf == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_text_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP text-tower keys under `prefix`."""
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            fused = [state[f"{src}self_attn.{p}_proj.{leaf}"] for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(fused)
            for ours, theirs in OPEN_CLIP_LAYER.items():
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """One original-layout state dict for an SD 1.x or SDXL pipeline (contiguous CPU tensors)."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    # original files name the CLIP text encoder's weights text_model.*; transformers >= 5.6 dropped that
    # level from CLIPTextModel's own state dict
    text = {
        k if k.startswith("text_model.") else "text_model." + k: v
        for k, v in pipe.text_encoder.state_dict().items()
        if not k.endswith("position_ids")
    }
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    else:
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
        second = pipe.text_encoder_2.state_dict()
        state.update(open_clip_text_to_ldm(second, "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
