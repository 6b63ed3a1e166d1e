"""One writer per run folder: an OS-level lock that `train` holds for its whole life.

The lock is `flock` on RUN/.lock (POSIX systems; elsewhere there is no lock): the operating system drops it
when the process ends, however it ends (SIGKILL included), so a dead run never leaves a stale lock. The file itself stays and means nothing by its
presence; while held, it names its holder (pid, host, start time, command) for the message a second writer
gets. Only the main process of a multi-process run takes it (RANK 0, or no RANK).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from lora_grpo.errors import UserError

LOCK_FILE = ".lock"


def is_main_rank() -> bool:
    """This process is the one that writes the run folder (accelerate and torchrun set RANK)."""
    return os.environ.get("RANK", "0") == "0"


class RunLocked(UserError):
    """The run folder's lock is held by another process."""


def _holder_text(raw: bytes) -> str:
    try:
        who = json.loads(raw.decode("utf-8"))
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """`acquire()` takes the lock of `run_dir` (creating the folder) or raises RunLocked naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, doing: str, record: bool = True) -> RunLock:
        """`doing` completes the message: "... is in use by pid N on HOST, started T: {doing}". `record`
        writes this process as the holder (a mere check leaves the file as it was)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system (Windows): no flock, so no lock; everything else works
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunLocked(
                f"run folder {self.run_dir} is in use by another lora-grpo process ({holder}): {doing}"
            ) from None
        if record:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            who = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "argv": sys.argv}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(who).encode("utf-8"), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(run_dir: Path, doing: str) -> None:
    """Raise RunLocked when a process holds `run_dir`'s lock (a folder without a lock file is free)."""
    if not (Path(run_dir) / LOCK_FILE).is_file():
        return
    try:
        RunLock(run_dir).acquire(doing, record=False).release()
    except OSError:
        return  # a read-only run folder (someone else's, a read-only mount): nobody trains into it from here


def take_lock(run_dir: Path, doing: str, dry_run: bool = False) -> RunLock | None:
    """The lock a command that writes `run_dir` holds; a dry run only checks that it is free, and processes
    other than the main one take nothing (the main one holds it for them)."""
    if dry_run:
        check_unlocked(run_dir, doing)
        return None
    if not is_main_rank():
        return None
    return RunLock(run_dir).acquire(doing)


def hold_while_reading(run_dir: Path, doing: str) -> RunLock | None:
    """The lock of a run folder that is read whole (export): raises RunLocked while a run trains into it;
    None for a folder where no lock can be taken (read-only: nothing trains into it from here)."""
    try:
        return RunLock(run_dir).acquire(doing)
    except RunLocked:
        raise
    except OSError:
        return None
