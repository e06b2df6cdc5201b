"""A running generation as another thread sees and steers it: how far it is, a preview of the
image being made, and a stop that ends it early with what it has.

A :class:`Watch` is handed to :func:`~controlnet.generation.generate.generate`; the sampling loop
reports each step to it, decodes a preview when one has been asked for, and ends after the step
in which a stop was asked. A stopped generation still decodes its latents as they are and returns
(and a server writes) whole images: what it has, nothing half-written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Watch"]


class Watch:
    """Progress, previews and a stop for one generation; thread-safe. ``on_step(step, total)`` is
    called after each step (counted over every pass of the job)."""

    def __init__(self, on_step: Callable[[int, int], None] | None = None) -> None:
        self._stop = threading.Event()
        self._preview_asked = threading.Event()
        self._lock = threading.Lock()
        self.on_step = on_step
        self.step = 0
        self.total = 0
        self.started: float | None = None  # time.monotonic() of the first step's start
        #: (steps done, of total) where a stop ended the generation; None: it ran to the end
        self.stopped_at: tuple[int, int] | None = None
        self._preview: tuple[int, list[np.ndarray]] | None = None
        #: how a pass turns its current latents into images (set by the generation, per pass)
        self.decode: Callable[[Any], list[np.ndarray]] | None = None
        #: steps done before the current pass (the hires fix's second pass follows the first)
        self.offset = 0

    # ------------------------------------------------------------------ asked from outside
    def stop(self) -> None:
        """End the generation after its current step; it returns the images it has."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ask_preview(self) -> None:
        """Decode a preview of the image being made after the next step."""
        self._preview_asked.set()

    def preview(self) -> tuple[int, list[np.ndarray]] | None:
        """The latest preview: (the step it shows, its images), or None before any."""
        with self._lock:
            return self._preview

    def eta(self) -> float | None:
        """Seconds left, from the pace of the steps so far (None before the first step ends)."""
        with self._lock:
            if self.started is None or self.step == 0 or self.total == 0:
                return None
            pace = (time.monotonic() - self.started) / self.step
            return pace * (self.total - self.step)

    # ------------------------------------------------------------------ reported by the loop
    def begin(self, total: int) -> None:
        with self._lock:
            self.total = total
            if self.started is None:
                self.started = time.monotonic()

    def stepped(self, step: int, estimate: Any) -> None:
        """Step ``step`` of the current pass is done; ``estimate``: the latents (or the clean
        image they predict) a preview decodes."""
        with self._lock:
            self.step = self.offset + step
        if self._preview_asked.is_set() and self.decode is not None:
            self._preview_asked.clear()
            images = self.decode(estimate)
            with self._lock:
                self._preview = (self.offset + step, images)
        if self.on_step is not None:
            self.on_step(self.offset + step, self.total)

    def ended_early(self, step: int) -> None:
        with self._lock:
            self.stopped_at = (self.offset + step, self.total)
