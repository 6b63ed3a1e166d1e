"""Atomic checkpoints for exact resume.

A checkpoint is RUN/checkpoints/epoch_NNNNNN/ holding:
  adapter/pytorch_lora_weights.safetensors  the LoRA weights (diffusers format, fp32: loadable for sampling too)
  optimizer.bin, scheduler.bin              optimizer state (8-bit included) and LR scheduler, via accelerate
  random_states_<rank>.pkl                  python, numpy, torch and CUDA RNG of every rank, via accelerate
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

from lora_grpo.errors import UserError

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
        raise UserError(f"checkpoint {checkpoint} is unreadable ({err}); resume from an older one") from None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(accelerator, run_dir: str | Path, epoch: int, state: dict, keep: int) -> Path:
    """Every rank calls this (accelerate saves each rank's RNG); rank 0 finalises and renames."""
    final = checkpoint_path(run_dir, epoch)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        _write_synced(tmp / COMPLETE_MARKER, f"epoch {epoch}\n")
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
    return final


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


def find_resume_checkpoint(resume: str, run_dirs_root: Path, recipe_name: str) -> Path:
    """`--resume auto`: the newest complete checkpoint of the newest run of this recipe under
    `run_dirs_root`; `--resume PATH`: that checkpoint, or the newest complete one in that run folder."""
    if resume == "auto":
        newest = [
            found[-1]
            for run in run_dirs_root.glob(f"{recipe_name}-*")
            if (found := complete_checkpoints(run))
        ]
        if not newest:
            raise UserError(
                f"--resume auto found no run of recipe {recipe_name!r} with a complete checkpoint under "
                f"{run_dirs_root}: start without --resume, or give --resume RUN_DIR"
            )
        return max(newest, key=lambda checkpoint: checkpoint.stat().st_mtime)
    path = Path(resume).expanduser()
    if not path.exists():
        raise UserError(f"--resume {resume}: no such folder; give a run folder or RUN/checkpoints/epoch_N")
    if (path / COMPLETE_MARKER).is_file():
        return path
    if path.is_dir() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    if path.is_dir() and (path / STATE_FILE).is_file():
        raise UserError(
            f"checkpoint {path} has no {COMPLETE_MARKER} marker (it was interrupted while saving): resume from an older one"
        )
    raise UserError(
        f"--resume {resume}: no complete checkpoint there; give a run folder or RUN/checkpoints/epoch_N"
    )


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent
