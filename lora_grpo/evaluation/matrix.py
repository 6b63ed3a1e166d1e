"""The deployment matrix's grid: which (base, sampler, steps, CFG, LoRA strength, stacked LoRAs, img2img denoise)
cells an evaluation runs, from a YAML file (or a shipped grid) and the command line.

A grid file:
    images_per_prompt: 2            # optional: images a prompt in every cell (else --images-per-prompt)
    default: {sampler: ddim-eta1, steps: 20, guidance: 1.0, strength: 1.0}   # optional: the reference cell
    grids:                          # each entry: every combination of its lists, the rest from `default`
      - {sampler: [ddim, euler-a], steps: [10, 20, 40], guidance: [1.0, 2.5, 5.0, 7.5]}
      - {strength: [0.5, 0.75, 1.0, 1.25]}
      - {denoise: [0.5, 0.75, 0.9], guidance: [1.0, 2.5]}   # img2img from a picture (evaluation.img2img)
A cell with `denoise` runs diffusers' img2img pipeline from a picture noised that far (1: all the way); without
it, text to image. Other bases (`--bases`) and stacked LoRAs (`--with-lora`) each add the default cell on that model. Cells are
deduplicated; the default cell comes first. Every cell is compared with the same model without the safety
adapter (same base, sampler, steps, CFG and stacked LoRAs), which is shared by cells that differ only in
strength.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

from lora_grpo.errors import UserError
from lora_grpo.evaluation.samplers import SAMPLERS

CELL_KEYS = ("sampler", "steps", "guidance", "strength", "denoise")
FILE_KEYS = ("images_per_prompt", "default", "grids")
SHIPPED_GRIDS = ("toyworld", "toyworld-text", "sd")


@dataclass(frozen=True)
class Cell:
    base: str  # the model reference as the user gave it
    sampler: str  # a name in evaluation.samplers.SAMPLERS
    steps: int
    guidance: float
    strength: float  # the safety adapter's LoRA scale
    loras: tuple[tuple[str, float], ...] = ()  # stacked LoRAs: (file, scale)
    denoise: float | None = None  # img2img: how far the picture is noised (diffusers' strength); None: t2i

    def settings(self) -> dict:
        return {
            "base": self.base,
            "sampler": self.sampler,
            "steps": self.steps,
            "guidance": self.guidance,
            "strength": self.strength,
            "loras": [list(x) for x in self.loras],
            "denoise": self.denoise,
        }


@dataclass(frozen=True)
class MatrixSpec:
    default: dict  # partial cell settings (CELL_KEYS)
    grids: tuple[dict[str, tuple], ...]
    images_per_prompt: int | None = None
    source: str = ""


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _model_tag(cell: Cell) -> str:
    """The base and the stacked LoRAs, hashed: a folder name that never changes with argument order."""
    stack = ";".join(f"{f}:{s:g}" for f, s in cell.loras)
    return _short_hash(f"{cell.base}|{stack}")


def _denoise_tag(cell: Cell) -> str:
    return "" if cell.denoise is None else f"_i2i{cell.denoise:g}"


def reference_id(cell: Cell) -> str:
    """The folder of the cell's model without the safety adapter (strength plays no part)."""
    return f"{cell.sampler}_s{cell.steps}_cfg{cell.guidance:g}{_denoise_tag(cell)}_{_model_tag(cell)}"


def cell_id(cell: Cell) -> str:
    tag = _denoise_tag(cell)
    return f"{cell.sampler}_s{cell.steps}_cfg{cell.guidance:g}_w{cell.strength:g}{tag}_{_model_tag(cell)}"


# ------------------------------------------------------------------------------------------ reading
def _value(key: str, value, where: str):
    """One cell setting, checked: the type and range each key needs."""
    if key == "sampler":
        if value not in SAMPLERS:
            raise UserError(f"{where}: unknown sampler {value!r}: use one of {', '.join(SAMPLERS)}")
        return value
    if key == "steps":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: steps must be a whole number >= 1, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    if key == "guidance" and value < 1:
        raise UserError(f"{where}: guidance must be >= 1 (1 turns classifier-free guidance off), got {value}")
    if key == "strength" and value <= 0:
        raise UserError(f"{where}: strength must be > 0 (the safety LoRA's scale), got {value}")
    if key == "denoise" and not 0 < value <= 1:
        raise UserError(
            f"{where}: denoise must be in (0, 1] (img2img: how far the picture is noised), got {value}"
        )
    return float(value)


def _settings(data, where: str, lists: bool) -> dict:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of {', '.join(CELL_KEYS)}")
    unknown = sorted(set(data) - set(CELL_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}: use {', '.join(CELL_KEYS)}")
    out = {}
    for key, value in data.items():
        if lists:
            values = value if isinstance(value, list) else [value]
            if not values:
                raise UserError(f"{where}: {key} is an empty list: give at least one value")
            out[key] = tuple(_value(key, v, f"{where}, {key}") for v in values)
        else:
            out[key] = _value(key, value, f"{where}, {key}")
    return out


def parse_matrix(data, source: str) -> MatrixSpec:
    """A grid file's contents, validated; every problem is one line naming the file and the key."""
    if not isinstance(data, dict):
        raise UserError(f"matrix file {source} must be a mapping with {', '.join(FILE_KEYS)}")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise UserError(
            f"matrix file {source}: unknown key(s) {', '.join(unknown)}: use {', '.join(FILE_KEYS)}"
        )
    grids = data.get("grids", [])
    if not isinstance(grids, list):
        raise UserError(f"matrix file {source}: grids must be a list of mappings")
    images = data.get("images_per_prompt")
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
        raise UserError(
            f"matrix file {source}: images_per_prompt must be a whole number >= 1, got {images!r}"
        )
    return MatrixSpec(
        default=_settings(data.get("default", {}), f"matrix file {source}, default", lists=False),
        grids=tuple(
            _settings(g, f"matrix file {source}, grids[{i}]", lists=True) for i, g in enumerate(grids)
        ),
        images_per_prompt=images,
        source=source,
    )


def load_matrix(spec: str) -> MatrixSpec:
    """A grid file, or a shipped grid by name (toyworld: CFG up to 7.5 and img2img; toyworld-text: its
    text-to-image cells; sd: SD's usual range, CFG up to 9)."""
    from lora_grpo.recipe_files import read_yaml, shipped_recipe_dir

    path = Path(spec).expanduser()
    if not path.is_file() and spec in SHIPPED_GRIDS:
        path = shipped_recipe_dir() / "matrix" / f"{spec}.yaml"
    elif not path.is_file():
        raise UserError(
            f"matrix grid '{spec}' not found: give a YAML file or a shipped grid ({', '.join(SHIPPED_GRIDS)})"
        )
    return parse_matrix(read_yaml(path, "matrix file"), str(path))


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` of --with-lora (scale 1 when absent)."""
    path, sep, scale = text.rpartition(":")
    if not sep or not scale or "/" in scale or not path:
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        return text, 1.0
    if not math.isfinite(value):
        raise UserError(f"--with-lora {text}: the scale must be a finite number")
    return path, value


# ------------------------------------------------------------------------------------------ cells
def expand_cells(
    spec: MatrixSpec, default: Cell, bases: list[str], stacked: list[tuple[str, float]]
) -> list[Cell]:
    """Every cell of the grid on `default.base`, then the default cell on each other base and with the stacked
    LoRAs; the default cell (with the file's `default` applied) first, no cell twice."""
    first = replace(default, **spec.default)
    cells = [first]
    for grid in spec.grids:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            cells.append(replace(first, **dict(zip(keys, values, strict=True))))
    cells += [replace(first, base=b) for b in bases]
    if stacked:
        cells.append(replace(first, loras=tuple(stacked)))
    return list(dict.fromkeys(cells))
