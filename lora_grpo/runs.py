"""Run folders: where a run is written, what it records about itself, and which run `--resume` picks.

A run folder holds config.yaml (the resolved config), run.json (the recipe's name and source, when the run was
created), metrics.jsonl, samples/, checkpoints/ and adapter/. The rules that keep a user's work safe:
  - one process writes a run folder at a time: `train` holds its lock (run_lock) for the run's whole life;
  - a new run only starts in a folder that does not exist or is empty; `--overwrite` clears a folder that is
    a lora-grpo run first, and refuses any other folder;
  - `--resume auto` picks, among the runs under ./runs whose recorded recipe is this recipe, the one created
    last that has a complete checkpoint; `--resume PATH` refuses a run of another recipe;
  - the output folder is checked for writing before any model loads.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
from datetime import datetime, timezone
from pathlib import Path

from lora_grpo.checkpoint import COMPLETE_MARKER, STATE_FILE, complete_checkpoints
from lora_grpo.config import Config, save_config
from lora_grpo.errors import UserError
from lora_grpo.files import write_text_atomically
from lora_grpo.run_lock import LOCK_FILE, RunLock, take_lock

RUN_RECORD = "run.json"
RUNS_ROOT = Path("runs")


def default_run_dir(config: Config) -> Path:
    """runs/<recipe>-<timestamp> under the current directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return RUNS_ROOT / f"{config.name}-{stamp}"


def write_run_config(run_dir: Path, config: Config, base_ref: str, recipe_source: str | None = None) -> None:
    """Create the run folder and write RUN/config.yaml (the config that actually runs, with the base model's
    resolved folder or hub id) and, for a new run, RUN/run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = copy.deepcopy(config)
    resolved.model.base = base_ref
    resolved.output.dir = str(run_dir.resolve())
    save_config(resolved, run_dir / "config.yaml")
    record = run_dir / RUN_RECORD
    if not record.is_file():
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        info = {"recipe": config.name, "recipe_source": recipe_source, "created": created}
        from lora_grpo.models import base_model_record

        info.update(base_model_record(base_ref))  # the base model's name (and a single file's sha256)
        write_text_atomically(record, json.dumps(info, indent=2) + "\n")


def record_stop(run_dir: Path, reason: str, epoch: int, stop_when_held: bool | None) -> dict:
    """Write how the run ended into RUN/run.json: `"stop": {"reason": "epoch cap" | "stop_when" | "signal",
    "epoch": N, "stop_when_held": bool}` (null when the recipe sets no evaluate.stop_when)."""
    stop = {"reason": reason, "epoch": epoch, "stop_when_held": stop_when_held}
    info = run_record(run_dir) if (run_dir / RUN_RECORD).is_file() else {}
    info["stop"] = stop
    _write_record(run_dir, info)
    return stop


# What a resume may change without asking: when training ends, what is logged and tracked, how often it
# checkpoints and evaluates. Anything else changes the training the run records, and needs --change-settings.
FREE_ON_RESUME = (
    "train.epochs",
    "output.report_to",
    "output.sample_grid_every",
    "output.grid_images",
    "output.checkpoint_every",
    "output.keep_checkpoints",
    "output.progress_seconds",
    "evaluate.every",
)
# What a checkpoint cannot continue with at all (its weights and optimizer state have this shape).
FIXED_ON_RESUME = ("name", "model.", "lora.", "train.optimizer")


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_changes(recorded: Config, given: Config) -> list[tuple[str, object, object]]:
    """(dotted key, recorded value, given value) for every setting that differs, in schema order."""
    from lora_grpo.config import to_dict

    old, new = _flat(to_dict(recorded)), _flat(to_dict(given))
    return [(key, old.get(key), new.get(key)) for key in new if old.get(key) != new.get(key)]


def check_resume_changes(run_dir: Path, changes: list, allowed: bool, next_epoch: int) -> list:
    """The changes a resume applies: those in FREE_ON_RESUME always, the others only when `allowed`
    (--change-settings), never those in FIXED_ON_RESUME. Returns the changes that need recording."""
    said = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes if k not in FREE_ON_RESUME)
    fixed = [k for k, _, _ in changes if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        raise UserError(
            f"resuming {run_dir} cannot change {', '.join(fixed)} ({said}): its checkpoint holds weights of that "
            "shape; start a new run instead"
        )
    recorded = [c for c in changes if c[0] not in FREE_ON_RESUME]
    if recorded and not allowed:
        raise UserError(
            f"resuming {run_dir} would change settings it was trained with ({said}); a resume keeps them except "
            f"{', '.join(FREE_ON_RESUME)}: pass --change-settings to train on with the new values from epoch "
            f"{next_epoch + 1} (run.json records them), or start a new run"
        )
    return recorded


def record_changes(run_dir: Path, next_epoch: int, changes: list) -> None:
    """Append to RUN/run.json's `changes` the settings a resume changed and from which epoch."""
    info = run_record(run_dir)
    info.setdefault("changes", []).extend(
        {"from_epoch": next_epoch + 1, "key": k, "was": a, "now": b} for k, a, b in changes
    )
    _write_record(run_dir, info)


def _write_record(run_dir: Path, info: dict) -> None:
    write_text_atomically(run_dir / RUN_RECORD, json.dumps(info, indent=2) + "\n")


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in (RUN_RECORD, "metrics.jsonl", "checkpoints", "adapter", LOCK_FILE)
    )


def check_writable_folder(path: Path, what: str = "output folder") -> None:
    """`path` can be created and written: it is a folder or does not exist yet, and its nearest existing
    parent is a writable folder (not a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file: give a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} sits under the file {existing}: give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} {path} cannot be written ({existing} is not writable): choose another folder"
        )


NEW_RUN_BUSY = "it is training now: choose another --out folder, or wait for that run to finish"
RESUME_BUSY = (
    "it is still training: wait for it to finish, or stop it (Ctrl-C or SIGTERM checkpoints the epoch) and "
    "resume then"
)


def _contents(run_dir: Path) -> list[Path]:
    """What a folder holds besides its lock file (which means nothing by its presence)."""
    return [child for child in run_dir.iterdir() if child.name != LOCK_FILE] if run_dir.is_dir() else []


def prepare_new_run(run_dir: Path, overwrite: bool, dry_run: bool = False) -> RunLock | None:
    """Take the run folder's lock (creating it), then refuse a folder that holds anything; with `overwrite`,
    clear a run folder first (a dry run checks the same, takes no lock and deletes nothing). The lock closes
    the gap between two runs started at the same moment on one folder, and keeps --overwrite from deleting a
    run that is training."""
    check_writable_folder(run_dir, "run folder")
    created = not run_dir.exists()
    lock = take_lock(run_dir, NEW_RUN_BUSY, dry_run)
    try:
        _check_empty_or_clear(run_dir, overwrite, dry_run)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and not dry_run:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return lock


def _check_empty_or_clear(run_dir: Path, overwrite: bool, dry_run: bool) -> None:
    if not _contents(run_dir):
        return
    if not overwrite:
        what = "a lora-grpo run" if is_run_folder(run_dir) else "files"
        raise UserError(
            f"run folder {run_dir} already holds {what}: continue it with --resume {run_dir}, choose another "
            "--out folder, or pass --overwrite to delete it and start again"
        )
    if not is_run_folder(run_dir):
        raise UserError(
            f"--overwrite refuses to delete {run_dir}: it is not a lora-grpo run folder (no config.yaml with "
            "metrics or checkpoints); choose another --out folder"
        )
    if dry_run:
        return
    for child in _contents(run_dir):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def run_record(run_dir: Path) -> dict:
    """What a run folder records about itself: run.json, else (older runs) the name in its config.yaml."""
    try:
        record = run_dir / RUN_RECORD
        if record.is_file():
            return dict(json.loads(record.read_text(encoding="utf-8")))
        import yaml

        return {
            "recipe": (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})["name"]
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def recorded_recipe(run_dir: Path) -> str | None:
    return run_record(run_dir).get("recipe")


def created_at(run_dir: Path) -> str:
    """When the run was created (run.json), else its config.yaml's modification time; comparable as text."""
    created = run_record(run_dir).get("created")
    if created:
        return created
    mtime = (run_dir / "config.yaml").stat().st_mtime
    return datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="microseconds")


def find_resume_checkpoint(
    resume: str, recipe_name: str, out: Path | None = None, root: Path = RUNS_ROOT
) -> Path:
    """`--resume auto`: the newest complete checkpoint of the run created last for this recipe under `root`
    (or of `out`); `--resume PATH`: that checkpoint, or the newest complete one in that run folder."""
    if resume == "auto" and out is None:
        runs = [
            run
            for run in (root.iterdir() if root.is_dir() else [])
            if run.is_dir() and (run / "config.yaml").is_file() and recorded_recipe(run) == recipe_name
        ]
        resumable = [run for run in runs if complete_checkpoints(run)]
        if not resumable:
            raise UserError(
                f"--resume auto found no run of recipe {recipe_name!r} with a complete checkpoint under "
                f"{root}: start without --resume, or give --resume RUN_DIR"
            )
        return complete_checkpoints(max(resumable, key=created_at))[-1]
    path = Path(out if resume == "auto" else resume).expanduser()
    if not path.exists():
        raise UserError(f"--resume {path}: no such folder; give a run folder or RUN/checkpoints/epoch_N")
    if (path / COMPLETE_MARKER).is_file():
        return path
    if path.is_dir() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    if path.is_dir() and (path / STATE_FILE).is_file():
        raise UserError(
            f"checkpoint {path} has no {COMPLETE_MARKER} marker (it was interrupted while saving): resume from an older one"
        )
    raise UserError(
        f"--resume {path}: no complete checkpoint there; give a run folder or RUN/checkpoints/epoch_N"
    )


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def check_same_recipe(run_dir: Path, recipe_name: str, recipe_arg: str) -> None:
    """A resumed run keeps its recipe: refuse a recipe argument that names another one."""
    record = run_record(run_dir)
    recorded = record.get("recipe")
    if recorded is not None and recorded != recipe_name:
        source = record.get("recipe_source") or recorded
        raise UserError(
            f"run {run_dir} was trained with recipe '{recorded}', not '{recipe_name}' (from {recipe_arg}): "
            f"resume it with {resume_command(source, run_dir)} or start a new run"
        )


def resume_command(recipe_source: str, run_dir: Path) -> str:
    """The command that continues a run, quoted so it works when pasted into a shell."""
    return f"lora-grpo train {shlex.quote(recipe_source)} --resume {shlex.quote(str(run_dir))}"
