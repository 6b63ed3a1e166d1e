"""Prompt suites for evaluation: I2P, plain prompt files, COCO-style captions, GenEval metadata, attack CSVs.

Every loader returns a `Suite`: a name, whether its prompts are meant to be unsafe (I2P, attacks) or safe
(captions, GenEval), and one `EvalPrompt` per row. A row that cannot be read stops with one line naming the
file and the row.

I2P (Schramowski et al., CVPR 2023, "Safe Latent Diffusion"): columns `prompt`, `categories` (comma
separated: hate, harassment, violence, self-harm, sexual, shocking, illegal activity), `sd_seed`,
`sd_guidance_scale`; each row's seed and guidance are used unless the user overrides them.
GenEval (Ghosh et al., NeurIPS 2023): `evaluation_metadata.jsonl`, one JSON object per line with `prompt`,
`tag` and `include`; the whole line is kept so the images can be written in the layout GenEval reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_grpo.errors import UserError, first_line
from lora_grpo.prompts import parse_categories, prompt_part, read_csv_rows, read_prompt_lines

I2P_DATASET = "AIML-TUDA/i2p"
I2P_CATEGORIES = (
    "hate",
    "harassment",
    "violence",
    "self-harm",
    "sexual",
    "shocking",
    "illegal activity",
)
COCO_DATASET = "justram/COCO2014-Captions"  # the safe captions the SD recipes train on


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    seed: int | None = None  # the row's own seed (I2P's sd_seed); None: the run's seed
    guidance: float | None = None  # the row's own guidance (I2P's sd_guidance_scale); None: the run's
    categories: tuple[str, ...] = ()  # I2P categories of this prompt
    metadata: dict = field(default_factory=dict, hash=False, compare=False)  # GenEval's line, verbatim


@dataclass(frozen=True)
class Suite:
    name: str
    safety: str  # "unsafe" or "safe": which side of the alpha-sensitivity plot its prompts go on
    prompts: tuple[EvalPrompt, ...]
    source: str  # where it was read from (for the report)
    kind: str = "prompts"  # "i2p" | "prompts" | "captions" | "geneval" | "toyworld"
    # how this suite is evaluated unless a flag says otherwise (keys of EVAL_DEFAULTS); empty: EVAL_DEFAULTS
    defaults: dict = field(default_factory=dict, hash=False, compare=False)


# How `lora-grpo eval` generates and scores a suite that brings no defaults of its own: SD's usual sampler,
# the CLIP ViT-L/14 of SD 1.x, the paper's compact anchors at alpha 0.5, NudeNet on.
EVAL_DEFAULTS = {
    "steps": 50,
    "guidance": 7.5,
    "eta": 0.0,
    "clip": "openai/clip-vit-large-patch14",
    "anchors": "compact",
    "alpha": 0.5,
    "nudenet": True,
}
# The toy world's: its own CLIP and anchors and the `toyworld` recipe's sampler (20 steps, eta 1, CFG 1);
# NudeNet reads nothing in coloured shapes.
TOYWORLD_DEFAULTS = {
    "steps": 20,
    "guidance": 1.0,
    "eta": 1.0,
    "clip": "builtin:toyworld-clip",
    "anchors": "toyworld",
    "alpha": 0.2,
    "nudenet": False,
}


def _where(path: Path, row: int) -> str:
    return f"{path}, row {row}"


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    return read_csv_rows(path, "suite file")


def i2p_rows(rows: list[dict], where) -> list[EvalPrompt]:
    """I2P rows (dicts with prompt, categories, sd_seed, sd_guidance_scale) -> EvalPrompts.

    where(i) names row i (1-based, after the header) in an error.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        prompt = str(row.get("prompt") or "").strip()
        if not prompt:
            raise UserError(f"I2P suite {where(i)}: empty prompt: fix or delete the row")
        try:
            seed = int(float(row["sd_seed"])) if str(row.get("sd_seed") or "").strip() else None
            guidance = (
                float(row["sd_guidance_scale"]) if str(row.get("sd_guidance_scale") or "").strip() else None
            )
        except ValueError:
            raise UserError(
                f"I2P suite {where(i)}: sd_seed '{row.get('sd_seed')}' / sd_guidance_scale "
                f"'{row.get('sd_guidance_scale')}' is not a number: fix the row"
            ) from None
        out.append(EvalPrompt(prompt, seed, guidance, parse_categories(row.get("categories"))))
    return out


def load_i2p_csv(path: Path, category: str | None = None) -> Suite:
    fields, rows = _read_csv(path)
    missing = [c for c in ("prompt", "categories") if c not in fields]
    if missing:
        raise UserError(
            f"{path} is not an I2P CSV: no column '{missing[0]}' (columns: {', '.join(fields) or 'none'}); "
            "an I2P file has prompt, categories, sd_seed, sd_guidance_scale"
        )
    prompts = i2p_rows(rows, lambda i: _where(path, i))
    return _i2p_suite(prompts, str(path), category)


def _i2p_suite(prompts: list[EvalPrompt], source: str, category: str | None, part: str = "all") -> Suite:
    """I2P rows, optionally one category and one side of the fixed train/eval split (prompts.prompt_part)."""
    name = "i2p"
    if category:
        prompts = [p for p in prompts if category in p.categories]
        name = f"i2p-{category.replace(' ', '-')}"
    if part != "all":
        prompts = [p for p in prompts if prompt_part(p.prompt) == part]
        name = f"{name}-{part}"
    if not prompts:
        raise UserError(f"suite {name} from {source} has no prompts")
    return Suite(name, "unsafe", tuple(prompts), source, "i2p")


def _load_dataset(dataset: str, split: str = "train"):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"the suite reads the Hugging Face dataset '{dataset}', which needs the `datasets` package: "
            "pip install 'lora-grpo[datasets]', or pass the suite as a local CSV file"
        ) from None
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as err:  # the hub client raises many types; the user needs one line
        reason = first_line(err)
        raise UserError(
            f"could not load dataset '{dataset}': {reason}. Check your network, or pass a local CSV file"
        ) from None


def load_i2p_hub(category: str | None = None, part: str = "all") -> Suite:
    data = _load_dataset(I2P_DATASET)
    prompts = i2p_rows(list(data), lambda i: f"{I2P_DATASET} row {i}")
    return _i2p_suite(prompts, I2P_DATASET, category, part)


def i2p_suite_spec(spec: str) -> tuple[str | None, str] | None:
    """'i2p' -> (None, 'all'); 'i2p-self-harm-eval' -> ('self-harm', 'eval'); 'i2p-illegal-activity' ->
    ('illegal activity', 'all'); None for anything else."""
    if spec != "i2p" and not spec.startswith("i2p-"):
        return None
    rest, part = spec[4:], "all"
    if rest == "eval" or rest.endswith("-eval"):
        rest, part = rest[: -len("eval")].rstrip("-"), "eval"
    if not rest:
        return None, part
    names = {c.replace(" ", "-"): c for c in I2P_CATEGORIES}
    return (names[rest], part) if rest in names else None


def load_prompt_csv(path: Path, column: str, safety: str, kind: str = "prompts") -> Suite:
    """Any CSV with a prompt column: attack sets (MMA-Diffusion, Ring-A-Bell, UnlearnDiffAtk), captions."""
    fields, rows = _read_csv(path)
    if column not in fields:
        raise UserError(
            f"{path} has no column '{column}' (columns: {', '.join(fields) or 'none'}): "
            "pass --column with the one holding the prompts"
        )
    prompts = []
    for i, row in enumerate(rows, start=1):
        text = str(row.get(column) or "").strip()
        if not text:
            raise UserError(f"suite {_where(path, i)}: empty '{column}': fix or delete the row")
        seed = str(row.get("seed") or "").strip()
        try:
            prompts.append(EvalPrompt(text, int(seed) if seed else None))
        except ValueError:
            raise UserError(f"suite {_where(path, i)}: seed '{seed}' is not an integer") from None
    if not prompts:
        raise UserError(f"suite file {path} has no rows")
    return Suite(path.stem, safety, tuple(prompts), str(path), kind)


def load_text_prompts(path: Path, safety: str) -> Suite:
    prompts = read_prompt_lines(path, "suite file")
    if not prompts:
        raise UserError(f"suite file {path} is empty: write one prompt per line")
    return Suite(path.stem, safety, tuple(EvalPrompt(p) for p in prompts), str(path), "prompts")


def load_geneval(path: Path) -> Suite:
    """GenEval's evaluation_metadata.jsonl; each line is kept verbatim for the folder GenEval reads."""
    if not path.is_file():
        raise UserError(f"GenEval metadata file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"GenEval metadata {path} is not a UTF-8 text file") from None
    prompts = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"GenEval metadata {path}, line {i}: not JSON ({err.msg})") from None
        if not isinstance(meta, dict) or not str(meta.get("prompt") or "").strip():
            raise UserError(f"GenEval metadata {path}, line {i}: needs a non-empty 'prompt'")
        if "tag" not in meta or "include" not in meta:
            raise UserError(
                f"GenEval metadata {path}, line {i}: needs 'tag' and 'include' (GenEval's evaluator reads them)"
            )
        prompts.append(EvalPrompt(meta["prompt"].strip(), metadata=meta))
    if not prompts:
        raise UserError(f"GenEval metadata {path} has no lines")
    return Suite("geneval", "safe", tuple(prompts), str(path), "geneval")


def load_toyworld_suite() -> Suite:
    """Every toy-world composition: red ones are the unsafe prompts (kind 'toyworld', read by the pixel evaluator)."""
    from lora_grpo.toyworld.world import all_compositions

    prompts = tuple(EvalPrompt(c.caption, categories=(c.colour,)) for c in all_compositions())
    return Suite("toyworld", "unsafe", prompts, "lora_grpo.toyworld", "toyworld", TOYWORLD_DEFAULTS)


# i2p-<category> for each of I2P_CATEGORIES (spaces as dashes), and -eval for the held-out fifth
SHIPPED_SUITES = ("i2p", "i2p-sexual", "i2p-violence-eval", "coco-captions", "geneval", "toyworld")


def load_suite(spec: str, column: str = "prompt", safety: str | None = None) -> Suite:
    """A shipped suite name or a path: .jsonl (GenEval), .csv (I2P when it has I2P columns, else `column`),
    anything else one prompt per line."""
    if (i2p := i2p_suite_spec(spec)) is not None:
        return load_i2p_hub(*i2p)
    if spec == "coco-captions":
        data = _load_dataset(COCO_DATASET)
        if "caption" not in data.column_names:
            raise UserError(
                f"dataset {COCO_DATASET} has no 'caption' column ({', '.join(data.column_names)})"
            )
        captions = [str(r["caption"]).strip() for r in data if str(r["caption"] or "").strip()]
        return Suite(
            "coco-captions", "safe", tuple(EvalPrompt(c) for c in captions), COCO_DATASET, "captions"
        )
    if spec == "geneval":
        raise UserError(
            "the geneval suite needs GenEval's prompt file: pass --suite PATH/evaluation_metadata.jsonl "
            "(prompts/evaluation_metadata.jsonl in the GenEval repository)"
        )
    if spec == "toyworld":
        return load_toyworld_suite()
    path = Path(spec)
    if path.is_dir():
        raise UserError(
            f"suite {spec} is a folder: give a prompt file (.txt, .csv, GenEval .jsonl) inside it"
        )
    if not path.exists() and (path.suffix or "/" in spec):
        raise UserError(f"suite file not found: {spec}")
    if not path.exists():
        raise UserError(
            f"unknown suite '{spec}': use one of {', '.join(SHIPPED_SUITES)} or a path to a prompt file "
            "(.txt, .csv, GenEval .jsonl)"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_geneval(path)
    if suffix == ".csv":
        fields, _ = _read_csv(path)
        if "categories" in fields and "prompt" in fields and column == "prompt":
            return load_i2p_csv(path)
        kind = "captions" if column == "caption" else "prompts"
        return load_prompt_csv(path, column, safety or ("safe" if kind == "captions" else "unsafe"), kind)
    return load_text_prompts(path, safety or "unsafe")
