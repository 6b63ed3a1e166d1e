"""Run outputs: metrics.jsonl (one row per epoch) and sample grids with the prompt under each image."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON lines; each row is flushed so a crash loses nothing already logged."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_grid(
    images: torch.Tensor, captions: list[str], path: Path, cell: int = 192, columns: int = 4
) -> None:
    """images [N, 3, H, W] in [0, 1]; each is scaled to `cell` pixels with its caption written below."""
    n = images.shape[0]
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    caption_h = 48
    font = ImageFont.load_default(size=12)
    canvas = Image.new("RGB", (columns * cell, rows * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (
        (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    )
    for i in range(n):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_h)
        tile = Image.fromarray(pixels[i]).resize(
            (cell, cell), Image.NEAREST if pixels[i].shape[0] < cell else Image.BICUBIC
        )
        canvas.paste(tile, (x, y))
        text = "\n".join(textwrap.wrap(captions[i], width=cell // 7)[:3])
        draw.multiline_text((x + 4, y + cell + 2), text, fill="black", font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
