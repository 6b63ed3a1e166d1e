"""The CLIP steering reward of SafeDiffusion-R1 (arXiv:2605.18719, Sec. 3).

v_safe = normalize(mean z(safe anchors) - mean z(unsafe anchors))
r(x, p) = cos(z_img(x), normalize(z_p + alpha * v_safe))                  ("steering")
r(x, p) = cos(z_img(x), normalize(z_p - (z_p . v) v + alpha * v_safe))     ("steering-projection")
r(x, p) = cos(z_img(x), z_p)                                              ("clip", the no-steering ablation)
All embeddings are unit-normalised before they are combined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_grpo.errors import UserError
from lora_grpo.recipe_files import read_yaml
from lora_grpo.rewards.clip_backends import ClipBackend

# The steering direction is normalize(mean z(safe) - mean z(unsafe)) over unit-norm CLIP embeddings. Below
# this norm of the difference (before normalising) the two anchor sets say nearly the same thing (two means
# at cosine > 0.9987), and the normalised direction is mostly CLIP's noise between near-synonyms: refused.
MIN_DIRECTION_NORM = 0.05


@dataclass(frozen=True)
class Anchors:
    safe: tuple[str, ...]
    unsafe: tuple[str, ...]
    source: str = field(default="the anchors", compare=False)  # where they came from, for messages


def same_phrases(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Two phrase lists say the same, up to case, spacing and order."""
    norm = lambda phrases: {" ".join(p.lower().split()) for p in phrases}  # noqa: E731
    return norm(a) == norm(b)


def load_anchors(path: str | Path) -> Anchors:
    """Read an anchor file: a YAML mapping with `safe:` and `unsafe:` lists of phrases."""
    data = read_yaml(Path(path), "anchor file")
    if not isinstance(data, dict) or set(data) - {"safe", "unsafe", "description"}:
        raise UserError(
            f"anchor file {path} must be a mapping with `safe:` and `unsafe:` lists (and an optional description)"
        )
    lists = {}
    for key in ("safe", "unsafe"):
        items = data.get(key) or []
        if not isinstance(items, list) or not all(isinstance(s, str) and s.strip() for s in items):
            raise UserError(f"anchor file {path}: `{key}` must be a list of non-empty phrases")
        lists[key] = tuple(s.strip() for s in items)
    if not lists["unsafe"]:
        raise UserError(
            f"anchor file {path} has no unsafe anchors: the steering direction needs at least one"
        )
    if same_phrases(lists["safe"], lists["unsafe"]):
        raise UserError(
            f"anchor file {path}: the safe and unsafe anchors are the same phrases ({'; '.join(lists['safe'])}), "
            "so the steering direction is zero and nothing would be removed: give the safe side what to draw instead"
        )
    return Anchors(lists["safe"], lists["unsafe"], str(path))


def anchor_difference(safe_embeds: Tensor, unsafe_embeds: Tensor) -> Tensor:
    """mean(safe) - mean(unsafe), not normalised; [S, D], [U, D] -> [D]. No safe anchors: -mean(unsafe)."""
    safe_mean = safe_embeds.mean(dim=0) if safe_embeds.shape[0] else torch.zeros_like(unsafe_embeds[0])
    return safe_mean - unsafe_embeds.mean(dim=0)


def steering_direction(safe_embeds: Tensor, unsafe_embeds: Tensor) -> Tensor:
    """v_safe = normalize(mean(safe) - mean(unsafe)); [S, D], [U, D] -> [D]. No safe anchors: -mean(unsafe)."""
    return F.normalize(anchor_difference(safe_embeds, unsafe_embeds), dim=-1)


def steered_targets(prompt_embeds: Tensor, direction: Tensor, alpha: float) -> Tensor:
    """normalize(z_p + alpha * v): [N, D], [D] -> [N, D]."""
    return F.normalize(prompt_embeds + alpha * direction, dim=-1)


def projected_targets(prompt_embeds: Tensor, direction: Tensor, alpha: float) -> Tensor:
    """Replace the prompt's component along v by alpha: normalize(z - (z.v) v + alpha v)."""
    along = (prompt_embeds @ direction).unsqueeze(-1) * direction  # [N, D]
    return F.normalize(prompt_embeds - along + alpha * direction, dim=-1)


def cosine(image_embeds: Tensor, targets: Tensor) -> Tensor:
    """Row-wise cosine similarity, [N, D] x [N, D] -> [N]."""
    return (F.normalize(image_embeds, dim=-1) * F.normalize(targets, dim=-1)).sum(dim=-1)


def encode_images_chunked(backend: ClipBackend, images: Tensor, chunk: int) -> Tensor:
    return torch.cat([backend.encode_images(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)])


def encode_prompts(backend: ClipBackend, prompts: list[str]) -> Tensor:
    """Encode each distinct prompt once (a batch holds every prompt G times); [N, D] in the input order."""
    unique = list(dict.fromkeys(prompts))
    embeds = backend.encode_text(unique)
    index = {p: i for i, p in enumerate(unique)}
    return embeds[torch.tensor([index[p] for p in prompts], device=embeds.device)]


class SteeringReward:
    """r(x, p) = cos(z_img, target(z_p)); the anchor direction is computed once, on first use."""

    def __init__(
        self, backend: ClipBackend, anchors: Anchors | None, alpha: float, mode: str = "add", chunk: int = 32
    ):
        if mode not in ("add", "project", "none"):
            raise ValueError(f"unknown steering mode {mode}")
        self.backend, self.anchors, self.alpha, self.mode, self.chunk = backend, anchors, alpha, mode, chunk
        self._direction: Tensor | None = None

    @property
    def direction(self) -> Tensor:
        if self._direction is None:
            assert self.anchors is not None
            safe = self.backend.encode_text(list(self.anchors.safe)) if self.anchors.safe else None
            unsafe = self.backend.encode_text(list(self.anchors.unsafe))
            safe = safe if safe is not None else unsafe[:0]
            norm = float(anchor_difference(safe, unsafe).norm())
            if norm < MIN_DIRECTION_NORM:
                raise UserError(
                    f"{self.anchors.source}: the safe and unsafe anchors embed almost alike (|mean safe - mean "
                    f"unsafe| = {norm:.3g} < {MIN_DIRECTION_NORM} in this CLIP), so the steering direction is "
                    "noise: give the safe side phrases that differ from the concept"
                )
            self._direction = steering_direction(safe, unsafe)
        return self._direction

    def targets(self, prompts: list[str]) -> Tensor:
        z = encode_prompts(self.backend, prompts)
        if self.mode == "none":
            return z
        if self.mode == "add":
            return steered_targets(z, self.direction, self.alpha)
        return projected_targets(z, self.direction, self.alpha)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        image_embeds = encode_images_chunked(self.backend, images, self.chunk)
        return cosine(image_embeds, self.targets(prompts).to(image_embeds.device))
