"""`lora-grpo check-reward`: does the steering reward, at the recipe's alpha, rank safe images above unsafe ones?

Run it before a long training run. For each prompt it prints the mean reward of images the user supplies
(a folder of safe and a folder of unsafe images) and warns when an unsafe prompt still prefers the unsafe
images (alpha too small to steer). Toy-world recipes render their own candidates instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_grpo.errors import UserError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image(path: Path) -> torch.Tensor:
    """One image file as a [3, H, W] float tensor in [0, 1]; a file that is not a readable image is one line."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated data
        raise UserError(f"image {path} cannot be read ({first_line(err)}): replace or remove it") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def load_image_folder(folder: str | Path) -> list[torch.Tensor]:
    """Every image in `folder` as a [3, H, W] tensor in [0, 1] (sizes may differ)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return [read_image(p) for p in paths]


@dataclass
class CheckRow:
    prompt: str
    safety: str
    safe_mean: float
    unsafe_mean: float
    problem: str | None


def mean_reward(reward_fn, images: list[torch.Tensor], prompt: str) -> float:
    return float(np.mean([reward_fn(img[None], [prompt]).item() for img in images]))


def check_reward(
    reward_fn, prompts: list[tuple[str, str]], safe: list[torch.Tensor], unsafe: list[torch.Tensor]
) -> list[CheckRow]:
    """prompts: (text, "safe"|"unsafe") pairs."""
    rows = []
    for text, safety in prompts:
        s, u = mean_reward(reward_fn, safe, text), mean_reward(reward_fn, unsafe, text)
        problem = None
        if safety == "unsafe" and u >= s:
            problem = "this unsafe prompt still prefers the unsafe images: raise reward.alpha"
        rows.append(CheckRow(text, safety, s, u, problem))
    return rows


def format_rows(rows: list[CheckRow], alpha: float) -> str:
    lines = [
        f"reward check at alpha {alpha}: mean reward of your safe vs unsafe images",
        f"{'prompt':<60}{'safe':>9}{'unsafe':>9}",
    ]
    for r in rows:
        lines.append(f"[{r.safety}] {r.prompt[:50]:<51}{r.safe_mean:>9.4f}{r.unsafe_mean:>9.4f}")
    for r in rows:
        if r.problem:
            lines.append(f"WARNING: '{r.prompt[:60]}': {r.problem}")
    if not any(r.problem for r in rows):
        lines.append("ok: every unsafe prompt prefers the safe images")
    return "\n".join(lines)


def recipe_check_prompts(config, per_set: int, prompts: list[str] | None = None) -> list[tuple[str, str]]:
    """The prompts a check uses: the given ones (as unsafe), else the first `per_set` of each recipe set."""
    from lora_grpo.prompts import load_prompt_set

    if prompts:
        return [(p, "unsafe") for p in prompts]
    out = []
    for s in config.prompts.sets:
        out += [(p, s.safety) for p in load_prompt_set(s).prompts[:per_set]]
    return out


def check_recipe_images(config, reward_fn, safe_dir, unsafe_dir, per_set: int = 3, prompts=None) -> str:
    """`check-reward` with the user's images: the report for the recipe's prompts (or `prompts`)."""
    rows = check_reward(
        reward_fn,
        recipe_check_prompts(config, per_set, prompts),
        load_image_folder(safe_dir),
        load_image_folder(unsafe_dir),
    )
    return format_rows(rows, config.reward.alpha)
