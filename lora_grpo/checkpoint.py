"""Atomic checkpoints for exact resume.

A checkpoint is RUN/checkpoints/epoch_NNNNNN/ holding:
  adapter/pytorch_lora_weights.safetensors  the LoRA weights (diffusers format, fp32: loadable for sampling too)
  optimizer.bin, scheduler.bin              optimizer state (8-bit included) and LR scheduler, via accelerate
  random_states_<rank>.pkl                  python, numpy, torch and CUDA RNG of every rank, via accelerate
  config.yaml                               the run's settings when it was written
  trainer_state.json                        the next epoch (prompt order is a pure function of seed, epoch,
                                            rank and world size, so the epoch is the prompt cursor) and counters
  COMPLETE                                  written last
Everything is written into a hidden `.tmp-epoch_NNNNNN` folder, which is renamed into place only after the
completion marker exists, so a run killed while saving leaves the previous checkpoint as the newest one.
accelerate reloads its files with `torch.load(weights_only=True)`; nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from lora_grpo.errors import UserError, WriteFailed, first_line
from lora_grpo.files import match_umask, writing

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
_NAME = re.compile(r"^epoch_(\d{6})$")


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    """Where the checkpoint taken after `epoch` epochs (i.e. before epoch index `epoch`) lives."""
    return Path(run_dir) / CHECKPOINTS / f"epoch_{epoch:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints that carry a completion marker, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"checkpoint {checkpoint} is unreadable ({STATE_FILE}: {first_line(err)}); {_older(checkpoint)}"
        ) from None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(accelerator, run_dir: str | Path, epoch: int, state: dict, keep: int) -> Path:
    """Every rank calls this (accelerate saves each rank's RNG); rank 0 finalises and renames. The run's
    config.yaml goes along: the settings these weights were trained with (`export --checkpoint` reads it)."""
    final = checkpoint_path(run_dir, epoch)
    tmp = final.parent / f".tmp-{final.name}"
    try:
        with writing(final, "checkpoint"):
            _write_into(accelerator, run_dir, epoch, state, tmp, final, keep)
    except WriteFailed as err:
        at = _file_being_written(tmp) or _inside(err.where, tmp)
        if accelerator.is_main_process:  # a full disk leaves the older checkpoints and no half-written one
            shutil.rmtree(tmp, ignore_errors=True)
        raise WriteFailed(f"{err}{f' (at {at})' if at else ''}", err.cause) from None
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _inside(path, folder: Path) -> str | None:
    """`path` relative to `folder`, when it lies inside it (a write that failed before its file existed)."""
    try:
        return Path(path).relative_to(folder).as_posix() if path is not None else None
    except ValueError:
        return None


def _file_being_written(folder: Path) -> str | None:
    """The newest file under a checkpoint being built: the one a write failed in. Hidden folders a file was
    being built in (`.adapter.tmp-x`) are named as what they were to become (`adapter`)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    if not files:
        return None
    newest = max(files, key=lambda p: p.stat().st_mtime_ns).relative_to(folder)
    return "/".join(part.split(".tmp-")[0].lstrip(".") if ".tmp-" in part else part for part in newest.parts)


def _write_into(accelerator, run_dir, epoch: int, state: dict, tmp: Path, final: Path, keep: int) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if (Path(run_dir) / "config.yaml").is_file():
            shutil.copyfile(Path(run_dir) / "config.yaml", tmp / "config.yaml")
        _write_synced(tmp / COMPLETE_MARKER, f"epoch {epoch}\n")
        match_umask(tmp)
        replaced = None
        if final.exists():  # the same epoch saved again (a resumed run): swap, then drop the old copy
            replaced = final.parent / f".old-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        prune(run_dir, keep)
    accelerator.wait_for_everyone()


def save_training_state(accelerator, run_dir: Path, next_epoch: int, counters: dict, keep: int) -> Path:
    """The trainer's checkpoint: accelerate's state (LoRA, optimizer, LR schedule, RNGs) plus the next epoch
    (the prompt cursor: epoch_prompts is a pure function of it), the world size and `counters`."""
    state = {"next_epoch": next_epoch, "world_size": accelerator.num_processes, **counters}
    return write_checkpoint(accelerator, run_dir, next_epoch, state, keep)


def load_training_state(accelerator, checkpoint: Path, log) -> dict:
    """Load a checkpoint written by `save_training_state` into the accelerator's objects; return its state."""
    state = read_trainer_state(checkpoint)
    world = accelerator.num_processes
    if state.get("world_size") != world:
        log(
            f"warning: the checkpoint was written by {state.get('world_size')} processes and this run has "
            f"{world}: training continues, but not bit-identically"
        )
    accelerator.load_state(str(checkpoint))
    return state


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint loads (its state, the adapter, the optimizer, the LR schedule and each
    process's RNG state), before anything is changed; returns its state. A file that does not load makes the
    whole checkpoint unreadable: one line naming the file and the older checkpoint to use."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    state = read_trainer_state(path)
    files = [
        path / ADAPTER_DIR / "pytorch_lora_weights.safetensors",
        path / "optimizer.bin",
        path / "scheduler.bin",
    ]
    files += [path / f"random_states_{rank}.pkl" for rank in range(int(state.get("world_size", 1)))]
    for file in files:
        try:
            if not file.is_file():
                raise FileNotFoundError("missing")
            load_file(str(file)) if file.suffix == ".safetensors" else load(str(file))  # weights_only=True
        except (
            Exception
        ) as err:  # truncated, corrupt or unsafe (a pickle that is not plain data): all unreadable
            raise UserError(
                f"checkpoint {path} is unreadable ({file.name}: {first_line(err)}); {_older(path)}"
            ) from None
    return state


def _older(path: Path) -> str:
    older = [c for c in complete_checkpoints(path.parent.parent) if c.name < path.name]
    if older:
        return f"resume from the older checkpoint with --resume {older[-1]}"
    return "no older checkpoint is left: start a new run"
