"""Drawing styles of the toy world: what a community fine-tune or a style LoRA changes about the pictures while
the captions, colours and positions keep their meaning (the pixel evaluator reads every style right).

plain     the pretraining style: a flat shape on gray
outline   a dark rim (the shape's colour at 70%) one pixel wide
small     shapes two thirds of the usual size
shaded    the fill lit from above: 15% lighter at the top edge to 15% darker at the bottom
blurred   the whole picture softened by a 3x3 binomial blur
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lora_grpo.toyworld.world import BACKGROUND, COLOURS, HALF_SIZE, Composition, render

STYLES = ("plain", "outline", "small", "shaded", "blurred")
SMALL_HALF_SIZE = (HALF_SIZE[0] * 2 / 3, HALF_SIZE[1] * 2 / 3)
RIM_DARKNESS = 0.7
SHADE = 0.15


def _shape_mask(image: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: pixels that are not the background (rendered shapes are flat on exact gray)."""
    background = torch.tensor(BACKGROUND, dtype=image.dtype).view(3, 1, 1)
    return (image - background).abs().amax(dim=0) > 1e-6


def _rim(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of the mask with a 4-neighbour outside it."""
    padded = F.pad(mask.float()[None, None], (1, 1, 1, 1))
    inner = -F.max_pool2d(-padded, kernel_size=3, stride=1)[0, 0] > 0.5  # erosion (3x3)
    return mask & ~inner


def _shaded(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = torch.nonzero(mask)[:, 0]
    top, bottom = rows.min().item(), rows.max().item()
    ys = torch.arange(image.shape[1], dtype=image.dtype).view(-1, 1)
    light = 1 + SHADE - 2 * SHADE * (ys - top) / max(1, bottom - top)  # [H, 1]
    return torch.where(mask, (image * light).clamp(0, 1), image)


def _blurred(image: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype)
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    padded = F.pad(image[None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel, groups=3)[0]


def render_styled(
    comp: Composition, style: str, rng: np.random.Generator, colour: str | None = None
) -> torch.Tensor:
    """One image [3, 32, 32] of `comp` in `style` (`colour`: draw another colour than the caption's)."""
    rgb = COLOURS[colour or comp.colour]
    if style == "small":
        return render(rgb, comp.shape, comp.position, rng, half_size=SMALL_HALF_SIZE)
    image = render(rgb, comp.shape, comp.position, rng)
    if style == "plain":
        return image
    mask = _shape_mask(image)
    if style == "outline":
        return torch.where(_rim(mask), image * RIM_DARKNESS, image)
    if style == "shaded":
        return _shaded(image, mask)
    if style == "blurred":
        return _blurred(image)
    raise ValueError(f"unknown style {style}: use one of {', '.join(STYLES)}")
