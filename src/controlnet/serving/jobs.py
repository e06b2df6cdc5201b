"""The jobs of a server: each generation it was given, by id, with its future, its progress and
preview (a :class:`~controlnet.generation.watch.Watch`) and its state; the finished ones are kept a
while for clients that poll, then forgotten."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..generation.watch import Watch

__all__ = ["Job", "JobTable", "UnknownJob"]


class UnknownJob(KeyError):
    """No job of that id (HTTP 404): never submitted, or finished long enough ago to be forgotten."""

    def __str__(self) -> str:
        return f"no job {self.args[0]!r} on this server (finished jobs are kept for a while, then forgotten)"


@dataclass
class Job:
    """A generation the server was given: its id, its future (an :class:`Output`) and its watch
    (progress, preview, stop)."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    watch: Watch = field(default_factory=Watch)
    submitted: float = field(default_factory=time.time)
    cancelled: bool = False

    @property
    def step(self) -> int:
        return self.watch.step

    @property
    def total(self) -> int:
        return self.watch.total

    @property
    def state(self) -> str:
        """queued, running, done, stopped (ended early by a cancel: it has images), cancelled
        (dropped before it ran) or failed."""
        f = self.future
        if f.cancelled():
            return "cancelled"
        if not f.done():
            return "running" if f.running() else "queued"
        if f.exception() is not None:
            return "failed"
        return "stopped" if f.result().stopped_at is not None else "done"


class JobTable:
    """Jobs by id, oldest first; beyond ``keep`` jobs, the oldest finished ones are forgotten.
    Not locked: its owner holds its lock around each call."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.future.done()]
        for old in finished[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[old.id]

    def get(self, job_id: str) -> Job:
        """The job of that id; UnknownJob otherwise."""
        if job_id not in self._jobs:
            raise UnknownJob(job_id)
        return self._jobs[job_id]
