"""Prompt sets (text/CSV files or Hugging Face datasets) and the deterministic safe/unsafe mixing.

Which prompts an epoch uses is a pure function of (sets, seed, epoch): each set is walked through a fresh
seeded permutation per pass, and each batch takes its share of every set by weight. Resuming at epoch k
therefore needs nothing but k.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_grpo.config import PromptSetConfig
from lora_grpo.errors import UserError, first_line


@dataclass(frozen=True)
class PromptSet:
    name: str
    safety: str  # "safe" or "unsafe"
    prompts: tuple[str, ...]
    weight: float
    pictures: tuple[str, ...] | None = None  # per prompt: the prompt its img2img picture is made from
    img2img: float | None = None  # share of its groups from pictures (None: sample.img2img.fraction)
    checked: bool = True  # periodic evaluation samples it where no cell names its sets

    def picture_of(self, prompt: str) -> str:
        """The prompt `prompt`'s img2img picture is made from in this set (itself unless `pictures` names
        another). The same prompt may start from different pictures in different sets."""
        if self.pictures is None:
            return prompt
        return self.pictures[self.prompts.index(prompt)]


# CLIP's text window in tokens, start and end tokens included: SD 1.x/2.x and both SDXL text encoders cut a
# prompt there, so the words after it never reach the model.
TEXT_WINDOW = 77
_TOKENIZER = []  # open_clip's BPE tokenizer (the same vocabulary and merges as SD's CLIP), built once


def too_long(prompts: list[str] | tuple[str, ...]) -> list[str]:
    """The prompts longer than the text window. Every BPE token covers at least one UTF-8 byte, so a prompt of
    at most TEXT_WINDOW - 2 bytes fits and is not tokenised at all."""
    candidates = [p for p in prompts if len(p.encode("utf-8")) > TEXT_WINDOW - 2]
    if not candidates:
        return []
    if not _TOKENIZER:
        from open_clip.tokenizer import SimpleTokenizer

        _TOKENIZER.append(SimpleTokenizer())
    return [p for p in candidates if len(_TOKENIZER[0].encode(p)) > TEXT_WINDOW - 2]


def long_prompt_note(where: str, prompts: list[str] | tuple[str, ...]) -> str | None:
    """One line when some of `prompts` are cut by the text window: how many, and the first of them."""
    long = too_long(prompts)
    if not long:
        return None
    first = long[0] if len(long[0]) <= 90 else long[0][:87] + "..."
    return (
        f"note: {len(long)} of {len(prompts)} prompts in {where} are longer than the text encoder's {TEXT_WINDOW} "
        f"tokens and are cut there (the first: {first!r}); shorten them so their ends count"
    )


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder: give a file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")


def read_prompt_lines(path: str | Path, what: str = "prompt file") -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines and `#` comment lines are skipped.

    The one reader of prompt text files (training sets, `sample --prompts`, evaluation suites). A missing
    file, a folder or a binary file is a one-line error; an empty result is left to the caller.
    """
    path = Path(path)
    _check_file(path, what)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a UTF-8 text file: save it as UTF-8 text") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_csv_rows(path: str | Path, what: str = "prompt file") -> tuple[list[str], list[dict]]:
    """(column names, rows) of a UTF-8 CSV file, with the same one-line errors as `read_prompt_lines`."""
    path = Path(path)
    _check_file(path, what)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a UTF-8 CSV file: save it as UTF-8 text") from None
    except csv.Error as err:
        raise UserError(f"{what} {path} is not a readable CSV file ({first_line(err)})") from None


EVAL_EVERY = 5  # prompt_part: one prompt in five is held out for evaluation


def normalise_prompt(text: str) -> str:
    """Lower case, single spaces, no surrounding space: the form a prompt's split is decided on."""
    return " ".join(str(text).lower().split())


def prompt_part(text: str) -> str:
    """'eval' or 'train': the fixed split of a prompt set. sha256 of the normalised prompt, as an integer,
    mod EVAL_EVERY == 0 is 'eval' (one in five). It depends on the prompt alone, so the same text is always on
    the same side (duplicates never straddle it), whatever the dataset's order or version."""
    digest = hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()
    return "eval" if int(digest, 16) % EVAL_EVERY == 0 else "train"


def parse_categories(text) -> tuple[str, ...]:
    """'sexual, violence' -> ('sexual', 'violence'): I2P's comma-separated labels, lower-cased."""
    return tuple(c.strip().lower() for c in str(text or "").split(",") if c.strip())


def _keep_row(row: dict, cfg: PromptSetConfig) -> bool:
    if not all(str(row.get(k)) == str(v) for k, v in cfg.filter.items()):
        return False
    wanted = {c.strip().lower() for c in cfg.categories}
    return not wanted or bool(wanted & set(parse_categories(row.get("categories"))))


def _in_part(items: list, part: str, prompt_of=lambda item: item) -> list:
    """The items (prompts, or rows holding one: `prompt_of`) whose prompt is on `part` of the split."""
    return items if part == "all" else [item for item in items if prompt_part(prompt_of(item)) == part]


def _read_csv_prompts(path: Path, cfg: PromptSetConfig, what: str) -> list[tuple[str, str]]:
    """(prompt, the prompt its picture is made from: `picture_column`'s, or the prompt itself) per kept row."""
    fields, rows = read_csv_rows(path, what)
    needed = [cfg.column, *cfg.filter, *(["categories"] if cfg.categories else [])]
    needed += [cfg.picture_column] if cfg.picture_column else []
    missing = [c for c in needed if c not in fields]
    if missing:
        raise UserError(
            f"prompt file {path} has no column '{missing[0]}' (columns: {', '.join(fields) or 'none'}): "
            "set the prompt set's `column` (or `picture_column`) to the one holding them"
        )
    column, picture = cfg.column, cfg.picture_column or cfg.column
    kept = [row for row in rows if _keep_row(row, cfg) and (row[column] or "").strip()]
    pairs = [(row[column].strip(), (row[picture] or "").strip() or row[column].strip()) for row in kept]
    return _in_part(pairs, cfg.part, prompt_of=lambda pair: pair[0])


def _read_dataset_prompts(cfg: PromptSetConfig) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"prompt set '{cfg.name}' reads the Hugging Face dataset '{cfg.dataset}', which needs the "
            "`datasets` package: pip install 'lora-grpo[datasets]'"
        ) from None
    try:
        data = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split)
    except Exception as err:  # the hub client raises many types; the user needs one line
        reason = first_line(err)
        raise UserError(
            f"could not load dataset '{cfg.dataset}' (config {cfg.dataset_config}, split {cfg.split}) for "
            f"prompt set '{cfg.name}': {reason}. Check the name and your network, or use a local `path:` file"
        ) from None
    if cfg.column not in data.column_names:
        raise UserError(
            f"dataset '{cfg.dataset}' has no column '{cfg.column}' (columns: {', '.join(data.column_names)}): "
            f"set prompts.sets[{cfg.name}].column"
        )
    if cfg.categories and "categories" not in data.column_names:
        raise UserError(
            f"dataset '{cfg.dataset}' has no 'categories' column to pick prompts.sets[{cfg.name}].categories "
            f"from (columns: {', '.join(data.column_names)})"
        )
    kept = [
        str(row[cfg.column]).strip()
        for row in data
        if _keep_row(row, cfg) and str(row[cfg.column] or "").strip()
    ]
    return _in_part(kept, cfg.part)


def load_prompt_set(cfg: PromptSetConfig) -> PromptSet:
    """Read one configured prompt set; an empty set is an error."""
    if cfg.path is not None:
        path = Path(cfg.path)
        what = f"prompt file for set '{cfg.name}'"
        if path.suffix.lower() == ".csv":
            pairs = _read_csv_prompts(path, cfg, what)
        else:
            pairs = [(p, p) for p in _in_part(read_prompt_lines(path, what), cfg.part)]
        source = str(path)
    else:
        pairs = [(p, p) for p in _read_dataset_prompts(cfg)]
        source = f"dataset {cfg.dataset}"
    if cfg.max_prompts is not None:
        pairs = pairs[: cfg.max_prompts]
    if not pairs:
        raise UserError(
            f"prompt set '{cfg.name}' is empty ({source}): add prompts or remove the set from the recipe"
        )
    check_one_picture(cfg.name, pairs)
    prompts = tuple(prompt for prompt, _ in pairs)
    pictures = tuple(picture for _, picture in pairs) if cfg.picture_column else None
    return PromptSet(cfg.name, cfg.safety, prompts, cfg.weight, pictures, cfg.img2img, cfg.checked)


def check_one_picture(name: str, pairs: list[tuple[str, str]]) -> None:
    """Within one set each prompt starts from one picture (across sets it may differ)."""
    seen: dict[str, str] = {}
    for prompt, picture in pairs:
        if seen.setdefault(prompt, picture) != picture:
            raise UserError(
                f"prompt {prompt!r} has two pictures' prompts in set '{name}' ({seen[prompt]!r} and "
                f"{picture!r}): give it one, or put the second in a set of its own"
            )


def set_schedule(weights: list[float], num_slots: int) -> list[tuple[int, int]]:
    """For prompt slots 0..num_slots-1: (set index, how many times that set was drawn before).

    Smooth weighted round-robin: every window of slots holds each set's share as closely as integers allow
    (weights 1:1 alternate, 3:1 give 3 then 1), and it is deterministic and never skips a set for long.
    """
    total = sum(weights)
    current = [0.0] * len(weights)
    drawn = [0] * len(weights)
    out = []
    for _ in range(num_slots):
        for i, w in enumerate(weights):
            current[i] += w
        pick = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[pick] -= total
        out.append((pick, drawn[pick]))
        drawn[pick] += 1
    return out


def _nth_prompt(prompt_set: PromptSet, set_index: int, k: int, seed: int) -> str:
    """The k-th prompt of an endless walk through `prompt_set`, a fresh permutation per pass."""
    n = len(prompt_set.prompts)
    cycle, pos = divmod(k, n)
    perm = np.random.default_rng([seed, set_index, cycle]).permutation(n)
    return prompt_set.prompts[perm[pos]]


def first_slot(
    epoch: int, batch: int, rank: int, world: int, prompts_per_batch: int, num_batches: int
) -> int:
    """Global number of the first prompt slot of (epoch, batch, rank). Slots are laid out so that one process
    with W * P prompts per batch covers exactly the slots of W processes with P each."""
    return ((epoch * num_batches + batch) * world + rank) * prompts_per_batch


def epoch_prompts(
    sets: list[PromptSet],
    prompts_per_batch: int,
    num_batches: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
) -> list[list[tuple[str, int]]]:
    """Prompts for one epoch on one process: `num_batches` lists of (prompt, set index).

    Prompt slots are numbered globally over epochs, batches and processes; `set_schedule` assigns each slot
    a set, and each set is walked without repetition until it is exhausted.
    """
    end = ((epoch + 1) * num_batches * world) * prompts_per_batch
    schedule = set_schedule([s.weight for s in sets], end)
    batches = []
    for b in range(num_batches):
        first = first_slot(epoch, b, rank, world, prompts_per_batch, num_batches)
        batch = []
        for g in range(first, first + prompts_per_batch):
            i, k = schedule[g]
            batch.append((_nth_prompt(sets[i], i, k, seed), i))
        batches.append(batch)
    return batches
