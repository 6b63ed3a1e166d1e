"""Recipe files as raw data: YAML read with one-line errors, `extends:` chains, dotted overrides, relative
paths made absolute, and the shipped recipes (package data under lora_grpo.recipes) found by name. Typing
and validation of that data are `config`'s job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `train.learning_rate=3e-5` into (["train", "learning_rate"], 3e-5); values are YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE: write it like train.learning_rate=3e-5")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' has an empty key: write it like sample.num_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], base_dir: Path | None = None) -> dict:
    """Set dotted keys in the raw recipe mapping (validation of the keys happens in `from_dict`). With
    `base_dir`, relative file paths the overrides give (prompt files, anchors) resolve against it."""
    for text in overrides:
        parts, value = parse_override(text)
        if base_dir is not None:
            patch: Any = value
            for part in reversed(parts):
                patch = {part: patch}
            resolve_recipe_paths(patch, base_dir)
            for part in parts:
                patch = patch[part]
            value = patch
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise UserError(f"override '{text}': '{dotted}' is not a section, it holds {child!r}")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: Path, what: str) -> Any:
    """Read a YAML file, turning a missing file or a parse error into one line."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a UTF-8 text file") from None


def resolve_recipe_paths(data: dict, base_dir: Path) -> None:
    """Make the relative file paths of raw recipe data (prompt files, the anchors file) absolute against
    `base_dir`, in place; anything malformed is left for validation to name."""
    for section in ("prompts", "evaluate"):  # prompts.sets and evaluate.sets
        block = data.get(section)
        sets = block.get("sets") if isinstance(block, dict) else None
        for item in sets if isinstance(sets, list) else []:
            if isinstance(item, dict) and isinstance(item.get("path"), str):
                item["path"] = _resolve_relative(item["path"], base_dir)
    reward = data.get("reward")
    if isinstance(reward, dict) and isinstance(reward.get("anchors"), str):
        reward["anchors"] = _resolve_relative(reward["anchors"], base_dir)


def _resolve_relative(path: str | None, base_dir: Path) -> str | None:
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def shipped_recipe_dir() -> Path:
    """The folder holding the shipped recipes, anchor sets and prompt files.

    Installed, they are the package `lora_grpo.recipes`; run from a source checkout without installing
    (`python -m lora_grpo.cli` in the repository), they are the repository's top-level recipes/.
    """
    from importlib import resources

    try:
        return Path(str(resources.files("lora_grpo.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "recipes"


def _parent_recipe(name: str, child: Path) -> Path:
    """The file `extends: name` means: a path relative to the child's folder (.yaml optional), else a
    shipped recipe of that name."""
    stem = name[:-5] if name.endswith(".yaml") else name
    for candidate in (
        child.parent / name,
        child.parent / f"{stem}.yaml",
        shipped_recipe_dir() / f"{stem}.yaml",
    ):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(
        f"recipe {child}: extends '{name}', which is neither a file next to it nor a shipped recipe "
        "(`lora-grpo recipes` lists them)"
    )


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def read_recipe_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file's raw data, its relative paths made absolute against its own folder and, with
    `extends: PARENT`, laid over the parent's data (the parent's name and description are not inherited)."""
    data = read_yaml(path, "recipe")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"recipe {path} must be a mapping of sections (model:, prompts:, ...), not {type(data).__name__}"
        )
    resolve_recipe_paths(data, path.resolve().parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise UserError(
            f"recipe {path}: 'extends' must name a recipe file or a shipped recipe, got {parent!r}"
        )
    parent_path = _parent_recipe(parent.strip(), path)
    chain = (*seen, path.resolve())
    if parent_path in chain:
        raise UserError(f"recipe {path}: extends '{parent}', which extends it back: break the loop")
    base = read_recipe_data(parent_path, chain)
    base.pop("name", None)
    base.pop("description", None)
    return deep_merge(base, data)
