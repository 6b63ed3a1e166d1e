"""A full disk, for real: a small tmpfs gives ENOSPC. Its size is swept one page (4 KiB) at a time, so the
failure lands in every file a run writes, in turn (run.json and config.yaml, sample grids, metrics, each file
of a checkpoint, the final adapter) and in every file of an export. Each ends in one line naming the cause and
the path, exit 2, no traceback, no temporary file left; the complete checkpoints still load; and after making
room, the command the line gives ends with the adapter of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli
from safetensors.torch import load_file

from lora_grpo.checkpoint import check_checkpoint, complete_checkpoints

pytestmark = pytest.mark.slow

PAGE = 4096
# tiny-test made small (rank 1, one batch, 4 steps) so a run writes ~84 pages and a probe takes a second
SMALL = [
    "train.epochs=2",
    "lora.rank=1",
    "lora.alpha=2",
    "sample.num_steps=4",
    "sample.sde_steps=3",
    "sample.batches_per_epoch=1",
    "train.gradient_accumulation_steps=1",
    "evaluate.every=0",
    "output.grid_images=2",
]
ADAPTER = "adapter/pytorch_lora_weights.safetensors"


@pytest.fixture
def tmpfs(tmp_path):
    """A mounted tmpfs and a function that empties it and sets its size in bytes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")

    def resize(size: int) -> Path:
        for child in mount.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)
        return mount

    yield resize
    subprocess.run(["umount", str(mount)], check=False)


def _same(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a failed write left behind (the lock file is not one)."""
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or ".old" in p.name]


def _kind(message: str) -> str:
    """Which file the line names: 'checkpoint FILE' (the file of the checkpoint it failed in), 'metrics',
    'the adapter', or FOLDER/FILE."""
    pattern = r"no space left on device writing (checkpoint|metrics|the adapter)?\s*(\S+?)(?: \(at (\S+)\))?;"
    match = re.search(pattern, message)
    assert match, message
    if match.group(1) == "checkpoint":  # the adapter's folder or its file: both are the adapter
        return f"checkpoint {match.group(3).split('/')[0]}"
    return match.group(1) or Path(match.group(2)).parent.name + "/" + Path(match.group(2)).name


def test_a_full_disk_anywhere_in_a_run_ends_in_one_line_and_resumes_exactly(tmpfs, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert run_cli(["train", "tiny-test", *SMALL, "--out", reference], capsys)[0] == 0
    kinds: dict[str, int] = {}
    for pages in range(1, 200):
        disk = tmpfs(pages * PAGE)
        run = disk / "run"
        code, _, err = run_cli(["train", "tiny-test", *SMALL, "--out", run], capsys)
        if code == 0:
            break  # from here on everything fits
        one_line_error(code, err, "no space left on device writing ")
        kind = _kind(err)
        assert not _leftovers(disk), (pages, err, _leftovers(disk))
        for checkpoint in complete_checkpoints(run):
            check_checkpoint(checkpoint)  # every file of every complete checkpoint loads
        if kind in kinds:
            continue
        kinds[kind] = pages
        # make room, then run what the line says: resume (or start again), to the uninterrupted adapter
        command = shlex.split(err.split("`")[1])
        subprocess.run(["mount", "-o", f"remount,size={400 * PAGE}", str(disk)], check=True)
        code, _, err = run_cli(command[1:], capsys)
        assert code == 0, (pages, err)
        assert _same(run / ADAPTER, reference / ADAPTER), (pages, kind)
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2], (pages, kind, epochs)  # a torn or repeated row never survives a resume
    else:
        pytest.fail("the run never fitted")
    checkpoint_files = ["adapter", "optimizer.bin", "scheduler.bin"]
    checkpoint_files += ["random_states_0.pkl", "trainer_state.json", "config.yaml", "COMPLETE"]
    wanted = {"metrics", "the adapter", "run/config.yaml", "run/run.json", "samples/epoch_0001.png"}
    wanted |= {f"checkpoint {name}" for name in checkpoint_files}
    assert wanted <= set(kinds), sorted(set(kinds))


def test_a_full_disk_during_export_leaves_nothing_at_the_target(tmpfs, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", "tiny-test", *SMALL, "--out", run], capsys)[0] == 0
    failures = 0
    for pages in range(1, 200):
        disk = tmpfs(pages * PAGE)
        code, _, err = run_cli(["export", run, "--out", disk / "export"], capsys)
        if code == 0:
            break
        failures += 1
        one_line_error(code, err, f"no space left on device writing the export {disk / 'export'}")
        assert list(disk.iterdir()) == [], (pages, list(disk.iterdir()))  # no partial export, no temp folder
    else:
        pytest.fail("the export never fitted")
    assert failures >= 10  # the sweep met every file of the export (about a dozen pages of them)


def test_a_full_disk_in_new_recipe_and_eval_is_one_line(tmpfs, capsys):
    disk = tmpfs(PAGE)
    (disk / "ballast").write_bytes(b"\0" * PAGE)  # the disk is full
    args = ["new-recipe", "no-cars", "--remove", "a car", "--instead", "a bicycle", "--out", disk]
    one_line_error(*run_cli(args, capsys)[::2], "no space left on device writing the recipe folder")
    assert sorted(p.name for p in disk.iterdir()) == ["ballast"]
    args = [
        "eval",
        "--base",
        "builtin:toyworld-sd",
        "--suite",
        "toyworld",
        "--max-prompts",
        "2",
        "--out",
        disk / "e",
    ]
    one_line_error(*run_cli(args, capsys)[::2], "no space left on device writing ")
    assert not _leftovers(disk)
