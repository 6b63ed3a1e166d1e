"""Helpers for tests that drive the command line: a folder's snapshot, the one-line error check."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from lora_grpo.cli import main
from lora_grpo.run_lock import LOCK_FILE


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes (but the run lock's file, which only names the
    last process that held the lock and means nothing by its content once that process is gone)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def one_line_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("lora-grpo: error: ") and "Traceback" not in err
    assert needle in lines[0], lines[0]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train_process(cwd: Path, *args: str) -> subprocess.Popen:
    """`lora-grpo train tiny-test ARGS` as a real second process, its output unbuffered into one pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "lora_grpo.cli", "train", "tiny-test", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
