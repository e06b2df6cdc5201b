"""A training run's metrics: ``metrics.csv`` (step, name, value), TensorBoard, and the loss and
score curves drawn as images, written by process 0."""

from __future__ import annotations

import csv
from pathlib import Path

from ..plots import line_plot

__all__ = ["Metrics"]


class Metrics:
    """Append-only metrics: ``metrics.csv`` (step, name, value) and TensorBoard, from process 0."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.writer = None
        if not enabled:
            return
        rows: list[list[str]] = []
        if self.path.is_file():  # keep what the resumed checkpoint had seen, drop what came after it
            with open(self.path, newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "name", "value"])
            w.writerows(rows)
        for step, name, value in rows:
            self.history.setdefault(name, []).append((int(step), float(value)))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a dependency, but the CSV alone is enough to go on
            self.writer = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for name, value in values.items():
                w.writerow([step, name, f"{value:.8g}"])
                self.history.setdefault(name, []).append((step, value))
                if self.writer is not None:
                    self.writer.add_scalar(name, value, step)

    def plot(self, run_dir: Path, hlines: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        names = [n for n in self.history if n in ("loss", "val_loss")]
        if names:
            line_plot({n: tuple(zip(*self.history[n])) for n in names}, run_dir / "loss.png", title="loss")
        # fractions (IoU, accuracies) share an axis; distances such as Delta E stay in metrics.csv
        scores = [
            n for n in self.history if n.startswith("score/") and all(0 <= v <= 1 for _, v in self.history[n])
        ]
        if scores:
            line_plot(
                {n[6:]: tuple(zip(*self.history[n])) for n in scores},
                run_dir / "scores.png",
                title="validation scores",
                hlines=hlines,
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
