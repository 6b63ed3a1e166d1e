"""`lora-grpo new-recipe NAME`: a ready recipe folder for removing any concept the user names.

From the concept's phrases (what to remove), what to draw instead, the unsafe prompts (a file, or built from
templates around the concept phrases), an optional base model and a parent recipe (default
`sd15-nudity-compact`, whose settings are sensible for SD 1.x), it writes

    OUT/NAME/NAME.yaml        extends the parent; the unsafe set, the parent's safe sets, the new anchors
    OUT/NAME/anchors.yaml     safe: the "instead" phrases; unsafe: the concept phrases
    OUT/NAME/prompts/*.txt    the unsafe prompts and the parent's local safe prompt files (copied)

atomically (a temporary folder renamed into place; an existing folder is never written over), validates it
by loading it, and with images given runs the reward-ordering check on it. Works the same for an object
("a car"), an art style ("in the style of Van Gogh"), a person's name or a harm category.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_grpo.config import load_config
from lora_grpo.errors import UserError
from lora_grpo.files import folder_built_beside, writing
from lora_grpo.prompts import read_prompt_lines
from lora_grpo.recipe_files import find_recipe, read_recipe_data
from lora_grpo.rewards.steering import load_anchors, same_phrases

# Prompt templates around a concept phrase when the user gives no prompt file: several framings (photo,
# painting, drawing, scene) so the LoRA learns the concept, not one sentence.
TEMPLATES = (
    "{c}",
    "a photo of {c}",
    "a high quality photo of {c}",
    "a close-up photo of {c}",
    "a painting of {c}",
    "a detailed drawing of {c}",
    "{c} in a city street",
    "{c} in nature, golden hour",
    "a picture of {c}, 4k, detailed",
    "an illustration of {c}",
)


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    remove: tuple[str, ...]  # the concept, in one or more phrases
    instead: tuple[str, ...]  # what to draw in its place
    prompts: Path | None = None  # unsafe prompts, one per line; None: TEMPLATES around `remove`
    safe_prompts: Path | None = None  # replaces the parent's safe sets
    base: str | None = None  # model.base for the recipe; None: the parent's
    parent: str = "sd15-nudity-compact"


def template_prompts(phrases: tuple[str, ...]) -> list[str]:
    """Every template around every concept phrase, in that order."""
    return [t.format(c=c) for c in phrases for t in TEMPLATES]


def check_spec(spec: ConceptSpec) -> None:
    if not spec.name or Path(spec.name).name != spec.name or spec.name.startswith("."):
        raise UserError(f"new-recipe NAME '{spec.name}' must be a plain folder name (letters, digits, - _ .)")
    for what, phrases in (("--remove", spec.remove), ("--instead", spec.instead)):
        if not [p for p in phrases if p.strip()]:
            raise UserError(f"new-recipe needs at least one {what} phrase")
    if same_phrases(spec.remove, spec.instead):
        raise UserError(
            f"new-recipe: --remove and --instead name the same phrases ({'; '.join(spec.remove)}): the steering "
            "direction would be zero and nothing would be removed; give --instead what to draw in its place"
        )


def _parent_sets(parent_data: dict, safety: str) -> list[dict]:
    return [s for s in parent_data.get("prompts", {}).get("sets", []) if s.get("safety", "safe") == safety]


def _share(parent_data: dict, safety: str) -> float:
    """The parent's total weight on `safety` prompts (0.5 when it has none): the new sets keep its mix."""
    return sum(float(s.get("weight", 1.0)) for s in _parent_sets(parent_data, safety)) or 0.5


def _safe_sets(parent_data: dict, spec: ConceptSpec, prompts_dir: Path) -> list[dict]:
    """The safe prompt sets of the new recipe: the user's file, or the parent's safe sets with their local
    files copied next to the recipe (datasets stay datasets)."""
    if spec.safe_prompts is not None:
        shutil.copyfile(spec.safe_prompts, prompts_dir / "safe.txt")
        weight = _share(parent_data, "safe")
        return [{"name": "safe", "safety": "safe", "path": "prompts/safe.txt", "weight": weight}]
    sets = []
    for item in _parent_sets(parent_data, "safe"):
        item = dict(item)
        if item.get("path"):
            source = Path(item["path"])
            shutil.copyfile(source, prompts_dir / source.name)
            item["path"] = f"prompts/{source.name}"
        sets.append(item)
    if not sets:
        raise UserError(
            f"recipe {spec.parent} has no safe prompt set to keep the model's quality: pass --safe-prompts FILE"
        )
    return sets


def recipe_text(spec: ConceptSpec, unsafe: dict, safe: list[dict], parent_stops: bool = False) -> str:
    header = [
        f"# {spec.name}: remove {', '.join(repr(p) for p in spec.remove)}, draw "
        f"{', '.join(repr(p) for p in spec.instead)} instead.",
        "# Written by `lora-grpo new-recipe`; every setting not here comes from the recipe it extends.",
        "# anchors.yaml holds the phrases above; check that the reward orders your images the right way first:",
        f"#   lora-grpo check-reward {spec.name}.yaml --safe-images DIR --unsafe-images DIR",
        f"# Run: lora-grpo train {spec.name}.yaml",
    ]
    body: dict = {"extends": spec.parent, "description": f"remove {spec.remove[0]} (new-recipe)"}
    if spec.base:
        body["model"] = {"base": spec.base}
    body["prompts"] = {"sets": [unsafe, *safe]}
    body["reward"] = {"anchors": "anchors.yaml"}
    if parent_stops:
        # the parent's conditions name its own prompt sets (eval/<set>/...): they would never hold here
        header.append(
            f"# evaluate.stop_when is cleared (the parent's named its own sets): use eval/{spec.name}/..."
        )
        body["evaluate"] = {"stop_when": []}
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def write_recipe(spec: ConceptSpec, out_root: Path) -> Path:
    """Write OUT_ROOT/NAME/ (see the module docstring) and return the recipe file; the folder appears whole
    or not at all."""
    check_spec(spec)
    target = Path(out_root) / spec.name
    if target.exists():
        raise UserError(f"{target} already exists: choose another NAME or --out, or remove it first")
    parent_path = find_recipe(spec.parent)
    parent_data = read_recipe_data(parent_path)
    if spec.prompts is not None:
        unsafe_prompts = read_prompt_lines(spec.prompts, "--prompts file")
        if not unsafe_prompts:
            raise UserError(f"--prompts file {spec.prompts} holds no prompts: write one per line")
    else:
        unsafe_prompts = template_prompts(spec.remove)
    if spec.safe_prompts is not None and not read_prompt_lines(spec.safe_prompts, "--safe-prompts file"):
        raise UserError(f"--safe-prompts file {spec.safe_prompts} holds no prompts: write one per line")
    with writing(target, "the recipe folder"), folder_built_beside(target) as tmp:
        (tmp / "prompts").mkdir()
        (tmp / "prompts" / "unsafe.txt").write_text("\n".join(unsafe_prompts) + "\n", encoding="utf-8")
        anchors = {
            "description": f"{spec.name}: written with lora-grpo new-recipe",
            "safe": list(spec.instead),
            "unsafe": list(spec.remove),
        }
        (tmp / "anchors.yaml").write_text(
            "# The user's phrases: unsafe = the concept to remove, safe = what to draw instead.\n"
            + yaml.safe_dump(anchors, sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
        weight = _share(parent_data, "unsafe")
        unsafe = {"name": spec.name, "safety": "unsafe", "path": "prompts/unsafe.txt", "weight": weight}
        safe = _safe_sets(parent_data, spec, tmp / "prompts")
        recipe = tmp / f"{spec.name}.yaml"
        stops = bool((parent_data.get("evaluate") or {}).get("stop_when"))
        recipe.write_text(recipe_text(spec, unsafe, safe, stops), encoding="utf-8")
        load_anchors(load_config(recipe).reward.anchors)  # it validates, or nothing is left behind
    return target / f"{spec.name}.yaml"
