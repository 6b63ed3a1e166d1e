"""Find shipped recipes (package data under lora_grpo.recipes) and recipe files given by path."""

from __future__ import annotations

from pathlib import Path

from lora_grpo.config import read_yaml, shipped_recipe_dir
from lora_grpo.errors import UserError


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name -> file."""
    return {p.stem: p for p in sorted(shipped_recipe_dir().glob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    """A path to an existing file wins; otherwise a shipped recipe name (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_recipes()
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    stem = Path(stem).name if stem.startswith("recipes/") else stem
    if stem in shipped:
        return shipped[stem]
    raise UserError(
        f"recipe '{name_or_path}' not found: give a path to a .yaml file or a shipped recipe "
        f"({', '.join(shipped) or 'none installed'}); `lora-grpo recipes` lists them"
    )


def recipe_summary(path: Path) -> str:
    """The recipe's one-line description (its `description:` key)."""
    data = read_yaml(path, "recipe")
    if isinstance(data, dict) and data.get("description"):
        return str(data["description"]).strip().splitlines()[0]
    return ""
