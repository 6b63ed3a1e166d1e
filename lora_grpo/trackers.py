"""Experiment trackers (`output.report_to: [tensorboard, wandb]`) through accelerate's tracker classes.

A training callback: every metrics row is logged as scalars at step = its epoch (one row per epoch, so the
x-axis matches metrics.jsonl), each sample grid as an image, the resolved config as hyperparameters.
TensorBoard writes to RUN/tensorboard/; W&B to the project `lora-grpo`, run name = the run folder's name,
files under RUN/wandb/ (set WANDB_MODE=offline to log without a network).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from lora_grpo.callbacks import RunContext
from lora_grpo.config import to_dict
from lora_grpo.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs


def require_packages(names: list[str]) -> None:
    """One line naming the install command when a tracker's package is missing (checked before training)."""
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        packages = " ".join(PACKAGES[n] for n in missing)
        raise UserError(
            f"output.report_to names {', '.join(missing)}, but its package is not installed: "
            f"pip install {packages} (or pip install 'lora-grpo[trackers]'), or remove it from output.report_to"
        )


def flat_config(data: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys with scalar values (lists as text), as hyperparameter tables want."""
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row (None, the JSON form of a non-finite value, is left out)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # [H, W, 3] uint8


class ExperimentTrackers:
    """Logs to each tracker in `names` (`tensorboard`, `wandb`)."""

    def __init__(self, names: list[str]):
        require_packages(names)
        self.names = list(names)
        self.trackers: list = []

    def on_start(self, ctx: RunContext) -> None:
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        for name in self.names:
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", ctx.run_dir)
            else:
                tracker = WandBTracker("lora-grpo", name=ctx.run_dir.name, dir=str(ctx.run_dir))
            tracker.start()
            tracker.store_init_configuration(flat_config(to_dict(ctx.config)))
            self.trackers.append(tracker)

    def on_epoch_end(self, ctx: RunContext, epoch: int, row: dict, grid: Path | None) -> dict:
        for tracker in self.trackers:
            tracker.log(scalars(row), step=epoch)
            if grid is not None:
                image = read_png(grid)
                if tracker.name == "tensorboard":
                    tracker.log_images({"samples": image[None]}, step=epoch, dataformats="NHWC")
                else:
                    tracker.log_images({"samples": [image]}, step=epoch)
        return {}

    def on_end(self, ctx: RunContext) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
