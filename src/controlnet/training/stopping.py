"""Stopping a training run on request: Ctrl-C (SIGINT) or a scheduler's SIGTERM (preemption, a
time limit) ends the run after the step it is in, with a checkpoint, so ``--resume`` continues it
exactly; a second signal stops at once. On several processes they agree when to stop (each
logging step), so every process writes its part of the same checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import torch

__all__ = ["StopRequests", "TrainingStopped"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(KeyboardInterrupt):
    """A run stopped on request after a step, its checkpoint written."""


class StopRequests:
    """A context in which SIGINT and SIGTERM are noted instead of ending the process (the first
    one; a second ends it at once). Signals within ``SAME_REQUEST_S`` of the first are the same
    request reaching the process twice (a launcher such as torchrun passes on the SIGTERM its
    process group also got). Outside the main thread signals cannot be caught: nothing changes
    there."""

    SAME_REQUEST_S = 1.0

    def __init__(self) -> None:
        self.signal: str | None = None
        self._first = 0.0
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._note) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if time.monotonic() - self._first < self.SAME_REQUEST_S:
                return
            self._restore()  # asked again: at once, as without this context
            raise KeyboardInterrupt(f"{name} again: stopped at once, without a checkpoint")
        self.signal, self._first = name, time.monotonic()
        print(f"\n{name}: stopping after this step with a checkpoint (again: at once)", file=sys.stderr)

    def agreed(self, accelerator: Any, *, exchange: bool) -> bool:
        """Whether the run stops now. One process: as soon as a signal came. Several: only when
        ``exchange`` (a step where the processes meet anyway), if any of them had one."""
        asked = self.signal is not None
        if accelerator.num_processes == 1:
            return asked
        if not exchange:
            return False
        flag = torch.tensor(float(asked), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
