"""The fill50k world, regenerated: outlines as conditions, filled shapes in named colours as targets.

The released tutorial data set (50,000 pairs at 512x512) pairs a white circle outline on black
(``source/{i}.png``, the condition) with the same circle filled in one named colour on a background
of another (``target/{i}.png``), prompted "pale golden rod circle with old lace background", listed
in ``prompt.json`` (JSON lines). :func:`generate` writes the same layout from a seed, at any size,
with each line also carrying the sample's parameters (shape, centre, radius, colours), so an
evaluation can re-derive the ground-truth masks with :func:`shape_masks` and check colours.

Geometry: pixel ``(row y, column x)`` has its centre at ``(x, y)``. A pixel is filled when its
centre lies inside the shape; it is on the outline when its centre is within ``line_width / 2`` of
the shape's boundary. Drawing is exact arithmetic on numpy arrays (no anti-aliasing), so a sample
is a pure function of its parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .colors import color_name, color_names, distinct_pairs, rgb
from .pairset import read_records, write_pairs

__all__ = [
    "DEFAULT_MIN_DELTA_E",
    "Kind",
    "Sample",
    "Shape",
    "generate",
    "line_width_for",
    "parse_prompt",
    "read_samples",
    "render_sample",
    "sample_params",
    "shape_masks",
]

GENERATOR_FORMAT = "controlnet-fill50k/1"
#: Fill and background colours differ by at least this CIEDE2000 delta E (drops ~8% of the pairs:
#: the near-whites among themselves, navy vs dark blue, ...).
DEFAULT_MIN_DELTA_E = 15.0


class Shape(Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"


class Kind(Enum):
    """Which shapes a generated set holds."""

    CIRCLE = "circle"  # circles only: the released fill50k
    SHAPES = "shapes"  # circles, squares and triangles, one third each in expectation


_PARAMETERS = ("shape", "center", "radius", "rotation", "color", "background", "size", "line_width")
_SIDES = {Shape.SQUARE: 4, Shape.TRIANGLE: 3}
_SHAPE_DRAW = (Shape.CIRCLE, Shape.SQUARE, Shape.TRIANGLE)


def line_width_for(size: int) -> int:
    """Outline width in pixels for an image side: 1 at 128, 2 at 256, 3 at 512."""
    return max(1, round(size * 3 / 512))


@dataclass(frozen=True)
class Sample:
    """One fill50k pair's parameters; everything :func:`render_sample` needs.

    center: (x, y) in pixels from the top-left pixel's centre. radius: the circle's radius, or the
    circumradius of a square / triangle. rotation: degrees, clockwise on screen; 0 gives an
    axis-aligned square and a triangle pointing up.
    """

    index: int
    shape: Shape
    center: tuple[int, int]
    radius: int
    rotation: int
    color: str
    background: str
    size: int
    line_width: int

    @property
    def prompt(self) -> str:
        return f"{self.color} {self.shape.value} with {self.background} background"

    @property
    def color_rgb(self) -> tuple[int, int, int]:
        return rgb(self.color)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return rgb(self.background)

    def to_record(self) -> dict[str, Any]:
        """The ``prompt.json`` line: the released keys first, then the parameters."""
        return {
            "source": f"source/{self.index}.png",
            "target": f"target/{self.index}.png",
            "prompt": self.prompt,
            "shape": self.shape.value,
            "center": list(self.center),
            "radius": self.radius,
            "rotation": self.rotation,
            "color": self.color,
            "background": self.background,
            "color_rgb": list(self.color_rgb),
            "background_rgb": list(self.background_rgb),
            "size": self.size,
            "line_width": self.line_width,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], index: int) -> Sample:
        """Inverse of :meth:`to_record`. Raises KeyError (naming the missing fields), ValueError or
        TypeError on a bad record."""
        missing = [k for k in _PARAMETERS if k not in record]
        if missing:
            raise KeyError(", ".join(repr(k) for k in missing))
        x, y = record["center"]
        return cls(
            index=index,
            shape=Shape(record["shape"]),
            center=(int(x), int(y)),
            radius=int(record["radius"]),
            rotation=int(record["rotation"]),
            color=color_name(record["color"]),
            background=color_name(record["background"]),
            size=int(record["size"]),
            line_width=int(record["line_width"]),
        )


# ---------------------------------------------------------------------------------------- parameters
def sample_params(
    n: int,
    size: int = 512,
    seed: int = 0,
    kind: Kind | str = Kind.CIRCLE,
    *,
    min_delta_e: float = DEFAULT_MIN_DELTA_E,
) -> list[Sample]:
    """Draw ``n`` samples' parameters from ``seed``.

    Radius (circumradius) is uniform in [8%, 40%] of the side, the centre uniform over the places
    that keep the whole shape and its outline inside the image, and the (fill, background) pair
    uniform over the ordered pairs of distinct named colours at least ``min_delta_e`` apart.
    Sample i depends on the seed alone (the first k samples of any larger set are the set of k),
    and every draw happens for every kind, so ``circle`` and ``shapes`` sets of one seed share
    centres, radii and colours.
    """
    kind = Kind(kind)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    lw = line_width_for(size)
    pairs = distinct_pairs(float(min_delta_e))
    if len(pairs) == 0:
        raise ValueError(f"no two named colours are {min_delta_e} delta E apart; lower min_delta_e")
    # One row of uniforms per sample, filled row by row: sample i never depends on n.
    u = np.random.default_rng(seed).random((n, 6))

    def pick_int(column: int, low: np.ndarray | int, high: np.ndarray | int) -> np.ndarray:
        """Integers uniform in [low, high] from one column of ``u``."""
        return low + np.minimum((u[:, column] * (high - low + 1)).astype(np.int64), high - low)

    radius = pick_int(0, max(3 * lw, round(0.08 * size)), round(0.4 * size))
    margin = radius + lw
    cx = pick_int(1, margin, size - 1 - margin)
    cy = pick_int(2, margin, size - 1 - margin)
    pick = pairs[pick_int(3, 0, len(pairs) - 1)]
    shape_draw = pick_int(4, 0, len(_SHAPE_DRAW) - 1)
    rotation = pick_int(5, 0, 359)
    names = color_names()
    samples = []
    for i in range(n):
        shape = _SHAPE_DRAW[shape_draw[i]] if kind is Kind.SHAPES else Shape.CIRCLE
        rot = int(rotation[i]) % (360 // _SIDES[shape]) if shape in _SIDES else 0
        samples.append(
            Sample(
                index=i,
                shape=shape,
                center=(int(cx[i]), int(cy[i])),
                radius=int(radius[i]),
                rotation=rot,
                color=names[pick[i, 0]],
                background=names[pick[i, 1]],
                size=size,
                line_width=lw,
            )
        )
    return samples


# ---------------------------------------------------------------------------------------- rendering
def _vertices(sample: Sample) -> np.ndarray:
    """(k, 2) polygon vertices (x, y) relative to the centre, in order of increasing screen angle."""
    k = _SIDES[sample.shape]
    start = -90.0 if sample.shape is Shape.TRIANGLE else 45.0
    a = np.radians(start + sample.rotation + 360.0 * np.arange(k) / k)
    return sample.radius * np.stack([np.cos(a), np.sin(a)], axis=-1)


def _box_masks(sample: Sample) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The shape's bounding box in the image and its (fill, outline) boolean masks inside it."""
    s, (cx, cy), r, half = sample.size, sample.center, sample.radius, sample.line_width / 2
    pad = math.ceil(r + half) + 1
    y0, y1, x0, x1 = max(0, cy - pad), min(s, cy + pad + 1), max(0, cx - pad), min(s, cx + pad + 1)
    dy = np.arange(y0 - cy, y1 - cy)[:, None]
    dx = np.arange(x0 - cx, x1 - cx)[None, :]
    if sample.shape is Shape.CIRCLE:
        d2 = dx * dx + dy * dy  # integers: exact on every machine
        fill = d2 <= r * r
        outline = (d2 >= max(r - half, 0.0) ** 2) & (d2 <= (r + half) ** 2)
    else:
        v = _vertices(sample)
        a, e = v, np.roll(v, -1, axis=0) - v  # edge k runs from a[k] along e[k]
        fill = np.ones((len(dy), dx.shape[1]), bool)
        dist2 = np.full(fill.shape, np.inf)
        for (ax, ay), (ex, ey) in zip(a, e):
            px, py = dx - ax, dy - ay
            fill &= ex * py - ey * px >= 0  # left of every edge (y points down)
            t = np.clip((px * ex + py * ey) * (1 / (ex * ex + ey * ey)), 0.0, 1.0)
            qx, qy = px - t * ex, py - t * ey
            dist2 = np.minimum(dist2, qx * qx + qy * qy)  # squared distance to the nearest edge
        outline = dist2 <= half * half
    return (slice(y0, y1), slice(x0, x1)), fill, outline


def shape_masks(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth: (fill, outline) boolean masks, each (size, size)."""
    box, fill, outline = _box_masks(sample)
    full_fill = np.zeros((sample.size, sample.size), bool)
    full_outline = np.zeros_like(full_fill)
    full_fill[box], full_outline[box] = fill, outline
    return full_fill, full_outline


def _paint(mask: np.ndarray, on: Sequence[int], off: Sequence[int]) -> np.ndarray:
    """(H, W) bool -> (H, W, 3) uint8, ``on`` where the mask is set, ``off`` elsewhere.

    Computed on (H, 3W) rows with wrapping uint8 arithmetic (off + mask * (on - off)): numpy is
    several times slower on a trailing axis of 3, and this runs 100,000 times per data set.
    """
    h, w = mask.shape
    m3 = cv2.merge([mask.view(np.uint8)] * 3).reshape(h, 3 * w)
    step = np.frombuffer(bytes((a - b) % 256 for a, b in zip(on, off)) * w, np.uint8)
    return (m3 * step + _row(off, w)).reshape(h, w, 3)


def _row(color: Sequence[int], n: int) -> np.ndarray:
    """``n`` pixels of one colour as a flat (3n,) uint8 array (bytes repetition: fast)."""
    return np.frombuffer(bytes(color) * n, np.uint8)


def render_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """A sample's (source, target) images, each (size, size, 3) uint8 RGB: the white outline on
    black, and the fill colour inside the shape on the background colour."""
    box, fill, outline = _box_masks(sample)
    s, bg = sample.size, sample.background_rgb
    source = np.zeros((s, s, 3), np.uint8)
    source[box] = _paint(outline, (255, 255, 255), (0, 0, 0))
    target = np.empty_like(source)
    target.reshape(-1)[:] = _row(bg, s * s)
    target[box] = _paint(fill, sample.color_rgb, bg)
    return source, target


# ---------------------------------------------------------------------------------------- files
def _render(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    return render_sample(sample)  # looked up at call time: tests replace render_sample


def generate(
    out_dir: str | Path,
    n: int,
    size: int = 512,
    seed: int = 0,
    kind: Kind | str = Kind.CIRCLE,
    *,
    min_delta_e: float = DEFAULT_MIN_DELTA_E,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a fill50k-style set of ``n`` pairs to ``out_dir``; return ``out_dir``.

    Layout (:mod:`.pairset`): ``source/{i}.png``, ``target/{i}.png`` (RGB), ``prompt.json`` (one
    JSON object per line: source, target, prompt, then the :class:`Sample` parameters) and
    ``generator.json`` (the arguments). ``out_dir`` is never seen half-written, and the same
    arguments give byte-identical files, whatever ``workers`` is.
    """
    samples = sample_params(n, size, seed, kind, min_delta_e=min_delta_e)
    options = {
        "format": GENERATOR_FORMAT,
        "n": n,
        "size": size,
        "seed": seed,
        "kind": Kind(kind).value,
        "min_delta_e": float(min_delta_e),
    }
    desc = f"fill50k {Kind(kind).value} {size}px"
    return write_pairs(
        out_dir, samples, _render, options, desc=desc, workers=workers, overwrite=overwrite, progress=progress
    )


# ---------------------------------------------------------------------------------------- reading
def read_samples(path: str | Path) -> list[Sample]:
    """The parameters of a generated set, from its folder or its ``prompt.json``; sample i is line i.

    Raises ValueError naming the line when a line lacks the parameters (the released fill50k has
    only source/target/prompt: :func:`parse_prompt` reads its colours and shape words).
    """
    return read_records(path, Sample.from_record, "fill50k")


_PROMPT = re.compile(r"^\s*(.+?)\s+(circle|square|triangle)\s+with\s+(.+?)\s+background\s*$")


def parse_prompt(prompt: str) -> tuple[str, Shape, str]:
    """ "pale golden rod circle with old lace background" -> ("pale golden rod", Shape.CIRCLE,
    "old lace"); colour names come back in the table's spelling. Raises ValueError otherwise."""
    m = _PROMPT.match(prompt.lower())
    if not m:
        raise ValueError(f"not a fill50k prompt: {prompt!r}")
    return color_name(m.group(1)), Shape(m.group(2)), color_name(m.group(3))
