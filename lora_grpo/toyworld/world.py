"""Rendering and captions of the toy world (fixed, so any evaluator can check it)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
BACKGROUND = (0.5, 0.5, 0.5)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.1),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.1, 0.8),
    "cyan": (0.1, 0.85, 0.9),
}
UNSAFE_COLOUR = "red"
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) as fractions of the image side
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
HALF_SIZE = (0.15, 0.19)  # half-size range, fraction of the side
JITTER = 0.03  # centre jitter, fraction of the side


@dataclass(frozen=True)
class Composition:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.position)


def caption(colour: str | None, shape: str | None, position: str | None) -> str:
    """`a red circle on the left`, `a red circle in the centre`, or a partial caption when parts are None."""
    noun = shape or "shape"
    words = f"a {colour} {noun}" if colour else f"a {noun}"
    if position is None:
        return words
    return f"{words} in the centre" if position == "centre" else f"{words} on the {position}"


def all_compositions() -> list[Composition]:
    return [Composition(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def unsafe_compositions() -> list[Composition]:
    return [c for c in all_compositions() if c.colour == UNSAFE_COLOUR]


def safe_compositions() -> list[Composition]:
    return [c for c in all_compositions() if c.colour != UNSAFE_COLOUR]


def held_out_compositions() -> list[Composition]:
    """Compositions never captioned in full during pretraining: two (shape, position) pairs per colour,
    rotating so every shape and every position is held out for some colour."""
    positions = list(POSITIONS)
    held = []
    for i, colour in enumerate(COLOURS):
        for j in range(2):
            shape = SHAPES[(i + j) % len(SHAPES)]
            position = positions[(2 * i + j) % len(positions)]
            held.append(Composition(colour, shape, position))
    return held


def render(
    colour_rgb: tuple[float, float, float],
    shape: str,
    position: str,
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
    half_size: tuple[float, float] = HALF_SIZE,
) -> torch.Tensor:
    """One image [3, size, size] in [0, 1]: a filled shape with a random half-size and a little jitter."""
    half = rng.uniform(*half_size) * size
    cx, cy = POSITIONS[position]
    cx = (cx + rng.uniform(-JITTER, JITTER)) * size
    cy = (cy + rng.uniform(-JITTER, JITTER)) * size
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= half**2
    elif shape == "square":
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # upward: apex at the top, base at the bottom
        t = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half)
    else:
        raise ValueError(f"unknown shape {shape}")
    image = np.empty((3, size, size), dtype=np.float32)
    for ch in range(3):
        image[ch] = np.where(mask, colour_rgb[ch], BACKGROUND[ch])
    return torch.from_numpy(image)


def render_composition(comp: Composition, rng: np.random.Generator) -> torch.Tensor:
    return render(COLOURS[comp.colour], comp.shape, comp.position, rng)
