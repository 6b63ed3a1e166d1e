"""Progress over a known count of work items (images to generate) that a user can read in a terminal and in a
piped log alike."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

PLAIN_EVERY_SECONDS = 30.0  # a piped log gets a line this often


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def eta_seconds(done: int, total: int, elapsed: float) -> float | None:
    """The time the rest takes at the rate so far; None before anything is done."""
    if done <= 0:
        return None
    return (total - done) * elapsed / done


class CountProgress:
    """In a terminal: a tqdm bar (its own rate and ETA). Otherwise (nohup, Slurm, CI logs): a plain line through
    `log` every `every_seconds` with the count, the share done and the ETA, so a piped log shows it is alive."""

    def __init__(
        self,
        total: int,
        what: str,
        unit: str,
        log: Callable[[str], None],
        every_seconds: float = PLAIN_EVERY_SECONDS,
        terminal: bool | None = None,
    ):
        from tqdm.auto import tqdm

        self.total, self.what, self.unit, self.log, self.every = total, what, unit, log, every_seconds
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, disable=not self.terminal)
        self.done = 0
        self.started = self.last = time.monotonic()

    def line(self, now: float) -> str:
        eta = eta_seconds(self.done, self.total, now - self.started)
        eta_text = "ETA after the first batch" if eta is None else f"ETA {format_duration(eta)}"
        share = self.done / self.total if self.total else 1.0
        return f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), {eta_text}"

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if not self.terminal and now - self.last >= self.every:
            self.last = now
            self.log(self.line(now))

    def close(self) -> None:
        self.bar.close()
        if not self.terminal and self.total:
            self.log(self.line(time.monotonic()))
