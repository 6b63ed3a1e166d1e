"""Graceful stop on SIGTERM / SIGINT: finish the epoch, write a checkpoint, exit.

A cluster scheduler's SIGTERM or a first Ctrl-C sets a flag; the trainer checks it (agreed across ranks) at
the end of each epoch, checkpoints and stops. A second Ctrl-C stops at once: the last complete checkpoint is
still intact because checkpoints are written atomically.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class TrainingInterrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """Raised after the checkpoint is written; carries the signal number for the exit status."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """Context manager installing the handlers (main thread only; elsewhere it is inert)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        name = signal.Signals(signum).name
        self.log(
            f"{name} received: finishing this epoch, then writing a checkpoint (Ctrl-C again to stop now)"
        )

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def agreed_signal(accelerator, stop: StopRequests) -> int:
    """The signal any process received (0: none), agreed across processes so all of them stop together."""
    return int(agreed_max(accelerator, float(stop.signum or 0)))


def agreed_max(accelerator, value: float) -> float:
    """The largest `value` any process holds (a decision every process then takes the same way)."""
    import torch

    flag = torch.tensor([value], device=accelerator.device)
    return float(accelerator.gather(flag).max().item())
