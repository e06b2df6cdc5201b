"""Small line plots written as PNG with Pillow alone (training curves, metric-vs-step plots)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .imageio import save_png

__all__ = ["line_plot"]

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    """A tick label: whole numbers as such (step 1000, not 1e+03), others to 3 significant digits."""
    if abs(v) >= 1e6:
        return f"{v:.2e}"
    return str(round(v)) if abs(v - round(v)) < 1e-9 else f"{v:.3g}"


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[int, int] = (720, 420),
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """Plot named (xs, ys) series on shared axes with ticks and a legend; save as PNG."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    extra = list((hlines or {}).values())
    if not pts:
        d.text((left, top), f"{title}: no data yet", fill="black")
        return save_png(img, path)
    xlo, xhi = min(p[0] for p in pts), max(p[0] for p in pts)
    ylo, yhi = min([p[1] for p in pts] + extra), max([p[1] for p in pts] + extra)
    if xhi == xlo:
        xhi = xlo + 1
    if yhi == ylo:
        yhi = ylo + 1
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - xlo) / (xhi - xlo) * (w - left - right),
            top + (1 - (y - ylo) / (yhi - ylo)) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for t in _ticks(ylo, yhi):
        _, y = px(xlo, t)
        d.line([(left, y), (w - right, y)], fill=(232, 232, 232))
        d.text((4, y - 6), _fmt(t), fill=(60, 60, 60))
    for t in _ticks(xlo, xhi):
        x, _ = px(t, ylo)
        d.line([(x, top), (x, h - bottom)], fill=(232, 232, 232))
        d.text((x - 10, h - bottom + 4), _fmt(t), fill=(60, 60, 60))
    for i, (name, y) in enumerate((hlines or {}).items()):
        _, yy = px(xlo, y)
        d.line([(left, yy), (w - right, yy)], fill=(160, 160, 160), width=1)
        d.text((w - right - 120, yy - 12 - 12 * i), name, fill=(110, 110, 110))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for p in line if len(line) < 40 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        y = top + 12 + 14 * i
        d.line([(left + 8, y), (left + 24, y)], fill=colour, width=3)
        d.text((left + 30, y - 6), name, fill=colour)
    d.text((left, 6), title, fill="black")
    d.text((w // 2 - 20, h - 16), xlabel, fill=(60, 60, 60))
    if ylabel:
        d.text((4, top - 22), ylabel, fill=(60, 60, 60))
    return save_png(img, path)
