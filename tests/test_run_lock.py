"""One writer per run folder, with real second processes: a live run's folder refuses a second train, an
--overwrite, a --resume and an export (naming the holder), exports a complete checkpoint with --checkpoint,
and frees itself when the holder is SIGKILLed; two runs started at the same moment leave one run's files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli, snapshot, train_process

from lora_grpo.checkpoint import complete_checkpoints
from lora_grpo.run_lock import LOCK_FILE, RunLock, RunLocked, check_unlocked

pytestmark = pytest.mark.slow


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    start = time.monotonic()
    while not complete_checkpoints(run):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - start < timeout
        time.sleep(0.05)
    return complete_checkpoints(run)[-1]


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    """In one process two descriptors conflict too (flock is per open file): the second acquire fails with
    this process's pid and host; after release the folder is free again."""
    first = RunLock(tmp_path / "run").acquire("busy")
    with pytest.raises(RunLocked, match=rf"in use by another lora-grpo process \(pid {os.getpid()} on "):
        RunLock(tmp_path / "run").acquire("busy")
    with pytest.raises(RunLocked, match=socket.gethostname()):
        check_unlocked(tmp_path / "run", "busy")
    first.release()
    check_unlocked(tmp_path / "run", "busy")
    assert (tmp_path / "run" / LOCK_FILE).is_file()  # left behind, meaning nothing


def test_a_live_run_refuses_every_second_writer_and_frees_itself_when_killed(tmp_path, capsys):
    run = tmp_path / "run"
    live = train_process(tmp_path, "train.epochs=500", "output.checkpoint_every=1", "--out", str(run))
    try:
        checkpoint = _wait_for_checkpoint(run, live)
        holder = f"pid {live.pid} on {socket.gethostname()}"
        for args, needle in [
            (["train", "tiny-test", "--out", run], holder),
            (["train", "tiny-test", "--out", run, "--overwrite"], "it is training now"),
            (["train", "tiny-test", "--resume", run], "it is still training: wait for it"),
            (["train", "tiny-test", "--resume", run, "--dry-run"], holder),
            (["export", run, "--out", tmp_path / "e"], "export a complete checkpoint with --checkpoint"),
        ]:
            code, _, err = run_cli(args, capsys)
            one_line_error(code, err, needle)
        assert (run / "metrics.jsonl").is_file() and (
            run / "config.yaml"
        ).is_file()  # --overwrite deleted nothing
        assert not (tmp_path / "e").exists()
        code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "e"], capsys)
        assert code == 0, err
        epoch = int(checkpoint.name.split("_")[1])
        card = (tmp_path / "e" / "README.md").read_text()
        assert (
            f"| epochs | | {epoch} |" in card
        )  # the checkpoint's own metrics, not the live run's later rows
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    frozen = snapshot(run)
    code, out, err = run_cli(["train", "tiny-test", "--resume", run, "--dry-run"], capsys)
    assert code == 0, err  # no stale lock after SIGKILL
    assert snapshot(run) == frozen


def test_two_runs_started_at_the_same_moment_leave_one_runs_files(tmp_path):
    runs = [train_process(tmp_path, "train.epochs=2", "--out", "run") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    codes = sorted(p.returncode for p in runs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in runs].index(2)]
    assert "lora-grpo: error: run folder run " in loser and "Traceback" not in loser
    rows = [
        json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == [1, 2]
