"""CLIP models behind one small interface: text and image embeddings, L2-normalised, fp32.

Images arrive as tensors in [0, 1] straight from the VAE decode (no PIL, no disk). Preprocessing on tensors
(bicubic antialiased resize of the short side, centre crop, normalise) matches the backends' own PIL
preprocessing to cosine > 0.9999.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_grpo.config import ClipConfig
from lora_grpo.errors import UserError, first_line, hub_load_error
from lora_grpo.tiny import BUILTIN_PREFIX, resolve_builtin


class ClipBackend(Protocol):
    image_size: int

    def encode_text(self, texts: list[str]) -> Tensor:
        """[N, D] unit-norm fp32 text embeddings."""
        ...

    def encode_images(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] in [0, 1] -> [N, D] unit-norm fp32 image embeddings."""
        ...


def preprocess_tensor(
    images: Tensor,
    resize: int,
    crop: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bicubic",
) -> Tensor:
    """CLIP preprocessing on a batch in [0, 1]: resize the short side to `resize`, centre crop `crop`, normalise."""
    h, w = images.shape[-2:]
    scale = resize / min(h, w)
    new_h, new_w = max(resize, round(h * scale)), max(resize, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = round((new_h - crop) / 2), round((new_w - crop) / 2)
    images = images[..., top : top + crop, left : left + crop]
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _resolve(ref: str) -> str:
    return str(resolve_builtin(ref[len(BUILTIN_PREFIX) :])) if ref.startswith(BUILTIN_PREFIX) else ref


class TransformersClip:
    """A transformers `CLIPModel` (hub id such as openai/clip-vit-large-patch14, or a local folder)."""

    def __init__(self, model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        ref = _resolve(model)
        local = Path(ref).expanduser()
        if (ref.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
            raise UserError(
                f"CLIP folder {ref} has no config.json: give a transformers CLIPModel folder or hub id"
            )
        try:
            self.model = CLIPModel.from_pretrained(ref, dtype=dtype).to(device).eval().requires_grad_(False)
            self.tokenizer = CLIPTokenizer.from_pretrained(ref)
            processor = CLIPImageProcessor.from_pretrained(ref)
        except Exception as err:  # hub, file and format errors (a truncated weights file) of many types
            if local.is_dir():
                raise UserError(
                    f"could not load CLIP folder {ref}: {first_line(err)} (a damaged or incomplete model "
                    "folder: copy or download it again)"
                ) from None
            raise hub_load_error("CLIP model", model, err) from None
        # transformers 5 gives SizeDicts; both support ["key"]
        self.image_size = int(processor.crop_size["height"])
        self.resize = int(processor.size["shortest_edge"] or self.image_size)
        self.mean = tuple(processor.image_mean)
        self.std = tuple(processor.image_std)
        self.interpolation = "bilinear" if int(processor.resample) == 2 else "bicubic"  # PIL codes
        self.device = torch.device(device)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        return F.normalize(_features(out).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        pixels = preprocess_tensor(
            images.float(), self.resize, self.image_size, self.mean, self.std, self.interpolation
        )
        dtype = next(self.model.parameters()).dtype
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
        return F.normalize(_features(out).float(), dim=-1)


def _features(out) -> Tensor:
    # transformers 5 returns a model output whose projected features are in .pooler_output.
    return out if isinstance(out, Tensor) else out.pooler_output


class OpenClip:
    """An open_clip model: a name (ViT-H-14) with a checkpoint file or pretrained tag, or `local-dir:PATH`.

    The SafeDiffusion-R1 paper used the HPSv2.1 checkpoint on ViT-H-14:
    `backend: open_clip, model: ViT-H-14, checkpoint: /path/HPS_v2.1_compressed.pt`.
    """

    def __init__(self, model: str, checkpoint: str | None = None, device: torch.device | str = "cpu"):
        import open_clip

        if model.startswith("local-dir:") and not (Path(model[10:]) / "open_clip_config.json").is_file():
            raise UserError(f"open_clip folder {model[10:]} has no open_clip_config.json")
        if checkpoint and ("/" in checkpoint or checkpoint.endswith((".pt", ".bin", ".safetensors"))):
            if not Path(checkpoint).expanduser().is_file():
                raise UserError(f"open_clip checkpoint not found: {checkpoint}")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=checkpoint, device=device
            )
            self.tokenizer = open_clip.get_tokenizer(model)
        except Exception as err:  # a truncated or foreign weights file raises many types
            raise UserError(
                f"could not load open_clip model '{model}' ({checkpoint}): {first_line(err)}"
            ) from None
        self.model.eval().requires_grad_(False)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(cfg["mean"])
        self.std = tuple(cfg["std"])
        self.interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        self.device = torch.device(device)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        size = self.image_size
        pixels = preprocess_tensor(images.float(), size, size, self.mean, self.std, self.interpolation)
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(pixels.to(self.device, dtype)).float(), dim=-1)


def load_clip(
    cfg: ClipConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ClipBackend:
    if cfg.backend == "transformers":
        if cfg.checkpoint:
            raise UserError(
                "reward.clip.checkpoint is for open_clip; transformers loads weights from reward.clip.model"
            )
        return TransformersClip(cfg.model, device, dtype)
    return OpenClip(cfg.model, cfg.checkpoint, device)
