"""The outlines world: several closed shapes of any kind per image, each filled in its own colour.

The fill50k world (:mod:`.fill50k`) holds one circle per image, and a ControlNet trained on it
paints a round disk whatever outline it is given. This world asks for the general skill: one to
``max_shapes`` closed outlines per image, of six kinds (circles, ellipses, regular polygons of 3 to
8 sides, stars, rounded rectangles and irregular blobs), from a few pixels across to filling the
frame, crossing one another or nested inside one another, with outlines 1 to ``max_line_width``
pixels wide. The condition is every outline, white on black; the target fills each shape in its
own named colour on a background of another, all colours of an image at least ``min_delta_e``
apart.

Paint order is a rule the condition shows: larger shapes first, so a smaller shape lies on top of
any larger one it crosses or sits in. The prompt names the shapes in that order, each with its
colour: ``"gold star, navy circle and pale green blob with white background"`` (one shape gives
exactly the fill50k prompt form). A sample's parameters go into its prompt.json line, from which
:func:`visible_masks` re-derives each shape's visible region for scoring
(:func:`controlnet.evaluation.metrics.outline_scores`).

A sample is a pure function of its parameters (the shapes' geometry: :mod:`.figures`). Sample i
is drawn from a generator seeded by ``(seed, i)``, so the first k samples of any larger set are
the set of k.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .colors import color_name, color_names, distinct_pairs, rgb
from .figures import (
    SHAPE_NAMES,
    SHIFT,
    Figure,
    FigureKind,
    area,
    fill_mask,
    fixed_point,
    inradius,
    random_detail,
)
from .fill50k import DEFAULT_MIN_DELTA_E
from .pairset import parallel_map, read_records, write_pairs

__all__ = [
    "Figure",
    "FigureKind",
    "OutlineSample",
    "generate_outlines",
    "parse_outline_prompt",
    "read_outline_samples",
    "render_outlines",
    "sample_outlines",
    "samples_of",
    "visible_masks",
]

GENERATOR_FORMAT = "controlnet-outlines/1"
_NEST_CHANCE = 0.3  # a later shape is placed inside an earlier one this often
_MIN_VISIBLE = 0.3  # every shape keeps at least this share of its area visible


@dataclass(frozen=True)
class OutlineSample:
    """One pair: its figures in paint order (back to front), background colour and drawing sizes."""

    index: int
    size: int
    line_width: int
    background: str
    figures: tuple[Figure, ...] = field(default_factory=tuple)

    @property
    def prompt(self) -> str:
        named = [f"{f.color} {f.name}" for f in self.figures]
        listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
        return f"{listed} with {self.background} background"

    def to_record(self) -> dict[str, Any]:
        return {
            "source": f"source/{self.index}.png",
            "target": f"target/{self.index}.png",
            "prompt": self.prompt,
            "size": self.size,
            "line_width": self.line_width,
            "background": self.background,
            "background_rgb": list(rgb(self.background)),
            "shapes": [f.to_record() for f in self.figures],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], index: int) -> OutlineSample:
        """Inverse of :meth:`to_record`; KeyError naming a missing field (quoted), ValueError or
        TypeError on a bad one."""
        try:
            return cls._from_record(record, index)
        except KeyError as e:
            raise KeyError(repr(e.args[0])) from None

    @classmethod
    def _from_record(cls, record: dict[str, Any], index: int) -> OutlineSample:
        return cls(
            index=index,
            size=int(record["size"]),
            line_width=int(record["line_width"]),
            background=color_name(record["background"]),
            figures=tuple(Figure.from_record(r) for r in record["shapes"]),
        )


# ---------------------------------------------------------------------------------------- geometry
def visible_masks(sample: OutlineSample) -> list[np.ndarray]:
    """Each figure's visible region (its fill less the fills of figures painted over it), in paint order."""
    return _visible([fill_mask(f, sample.size) for f in sample.figures])


def _visible(fills: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each fill less the fills after it (painted over it)."""
    out, above = [], np.zeros_like(fills[0])
    for fill in reversed(fills):
        out.append(fill & ~above)
        above |= fill
    return out[::-1]


def render_outlines(sample: OutlineSample) -> tuple[np.ndarray, np.ndarray]:
    """A sample's (source, target) images, each (size, size, 3) uint8 RGB."""
    s = sample.size
    source = np.zeros((s, s, 3), np.uint8)
    target = np.empty((s, s, 3), np.uint8)
    target[:] = rgb(sample.background)
    for f in sample.figures:
        pts = fixed_point(f.vertices())
        cv2.fillPoly(target, [pts], rgb(f.color), lineType=cv2.LINE_8, shift=SHIFT)
        cv2.polylines(source, [pts], True, (255, 255, 255), sample.line_width, cv2.LINE_8, SHIFT)
    return source, target


# ---------------------------------------------------------------------------------------- parameters
def _place(
    rng: np.random.Generator, kind: FigureKind, color: str, size: int, lw: int, parent: Figure | None
) -> Figure | None:
    """One figure inside the frame (outline included), or inside ``parent``; None if it cannot fit."""
    detail, rotation = random_detail(kind, rng), float(rng.uniform(0.0, 360.0))
    lo = max(3.0 * lw, 3.0)
    # every unit outline reaches exactly 1 from its centre, so a radius below these fits at any rotation
    hi = size / 2 - lw - 1 if parent is None else 0.7 * inradius(parent) - lw
    if hi < lo:
        return None
    radius = float(
        math.exp(rng.uniform(math.log(lo), math.log(hi)))
    )  # log-uniform: tiny ones as often as big
    if parent is None:  # anywhere the outline stays inside the frame
        v = Figure(kind, (0.0, 0.0), radius, rotation, color, detail).vertices()
        m = lw / 2 + 1
        cx = rng.uniform(m - v[:, 0].min(), size - 1 - m - v[:, 0].max())
        cy = rng.uniform(m - v[:, 1].min(), size - 1 - m - v[:, 1].max())
    else:  # near the parent's centre: the whole outline stays inside the parent's
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.3 * inradius(parent))
        cx, cy = parent.center[0] + d * math.cos(a), parent.center[1] + d * math.sin(a)
    return Figure(kind, (float(cx), float(cy)), radius, rotation, color, detail).rounded()


def _colours(rng: np.random.Generator, k: int, min_delta_e: float) -> list[str] | None:
    """k + 1 named colours pairwise at least ``min_delta_e`` apart (the last is the background)."""
    pairs = distinct_pairs(float(min_delta_e))
    ok = np.zeros((len(color_names()),) * 2, bool)
    ok[pairs[:, 0], pairs[:, 1]] = True
    chosen: list[int] = []
    for _ in range(k + 1):
        allowed = np.flatnonzero(np.all(ok[:, chosen], axis=1)) if chosen else np.arange(len(ok))
        allowed = np.setdiff1d(allowed, chosen)
        if len(allowed) == 0:
            return None
        chosen.append(int(rng.choice(allowed)))
    names = color_names()
    return [names[i] for i in chosen]


def _one_sample(
    index: int, seed: int, size: int, kinds: Sequence[FigureKind], max_shapes: int, max_lw: int, min_de: float
) -> OutlineSample:
    rng = np.random.default_rng([seed, index])
    lw = int(rng.integers(1, max_lw + 1))
    count = int(rng.integers(1, max_shapes + 1))
    colours = _colours(rng, count, min_de)
    if colours is None:
        raise ValueError(f"no {count + 1} named colours are {min_de} delta E apart; lower min_delta_e")
    figures: list[Figure] = []
    fills: list[np.ndarray] = []  # each figure's pixels, drawn once
    for colour in colours[:-1]:
        for _ in range(20):  # a few tries for a place where every shape stays visible enough
            parent = (
                figures[int(rng.integers(len(figures)))] if figures and rng.random() < _NEST_CHANCE else None
            )
            f = _place(rng, kinds[int(rng.integers(len(kinds)))], colour, size, lw, parent)
            if f is None:
                continue
            trial, trial_fills = _in_paint_order([*figures, f], [*fills, fill_mask(f, size)])
            shown = _visible(trial_fills)
            if all(v.sum() >= _MIN_VISIBLE * max(m.sum(), 1) for v, m in zip(shown, trial_fills)):
                figures, fills = trial, trial_fills
                break
    if not figures:  # nothing fitted (a very small frame): one shape alone always does
        figures = [f for f in [_place(rng, kinds[0], colours[0], size, lw, None)] if f is not None]
    return OutlineSample(index, size, lw, colours[-1], tuple(figures))


def _in_paint_order(
    figures: Sequence[Figure], fills: Sequence[np.ndarray]
) -> tuple[list[Figure], list[np.ndarray]]:
    """Figures and their fills, larger first: by pixels filled, then by exact area."""
    order = sorted(range(len(figures)), key=lambda i: (int(fills[i].sum()), area(figures[i])), reverse=True)
    return [figures[i] for i in order], [fills[i] for i in order]


def _kinds(kinds: Sequence[FigureKind | str] | None) -> tuple[FigureKind, ...]:
    if not kinds:
        return tuple(FigureKind)
    out = []
    for k in kinds:
        try:
            out.append(FigureKind(k))
        except ValueError:
            raise ValueError(
                f"unknown shape kind {k!r}; expected some of {', '.join(x.value for x in FigureKind)}"
            ) from None
    return tuple(dict.fromkeys(out))


def default_line_width(size: int) -> int:
    """The widest outline drawn at an image side: 2 px up to 320, 4 at 512."""
    return max(2, round(size * 4 / 512))


def sample_outlines(
    n: int,
    size: int = 128,
    seed: int = 0,
    *,
    kinds: Sequence[FigureKind | str] | None = None,
    max_shapes: int = 4,
    max_line_width: int | None = None,
    min_delta_e: float = DEFAULT_MIN_DELTA_E,
    workers: int | None = 1,
) -> list[OutlineSample]:
    """Draw ``n`` samples' parameters from ``seed``: 1 to ``max_shapes`` figures of ``kinds`` (all
    six by default) each, outlines 1 to ``max_line_width`` pixels wide; in ``workers`` processes
    (None: one per core), with the same result whatever their number."""
    kinds_ = _kinds(kinds)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
    lw = default_line_width(size) if max_line_width is None else max_line_width
    if not 1 <= lw <= size // 16:
        raise ValueError(f"max_line_width must be between 1 and {size // 16} at size {size}, got {lw}")
    args = [(i, seed, size, kinds_, max_shapes, lw, float(min_delta_e)) for i in range(n)]
    return parallel_map(_sample_star, args, workers)


def _sample_star(args: tuple[Any, ...]) -> OutlineSample:
    return _one_sample(*args)


def generate_outlines(
    out_dir: str | Path,
    n: int,
    size: int = 128,
    seed: int = 0,
    *,
    kinds: Sequence[FigureKind | str] | None = None,
    max_shapes: int = 4,
    max_line_width: int | None = None,
    min_delta_e: float = DEFAULT_MIN_DELTA_E,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write an outlines set of ``n`` pairs to ``out_dir`` in the fill50k layout (:mod:`.pairset`)."""
    kinds_ = _kinds(kinds)
    lw = default_line_width(size) if max_line_width is None else max_line_width
    samples = sample_outlines(
        n,
        size,
        seed,
        kinds=kinds_,
        max_shapes=max_shapes,
        max_line_width=lw,
        min_delta_e=min_delta_e,
        workers=workers,
    )
    options = {
        "format": GENERATOR_FORMAT,
        "n": n,
        "size": size,
        "seed": seed,
        "kinds": [k.value for k in kinds_],
        "max_shapes": max_shapes,
        "max_line_width": lw,
        "min_delta_e": float(min_delta_e),
    }
    return write_pairs(
        out_dir,
        samples,
        render_outlines,
        options,
        desc=f"outlines {size}px",
        workers=workers,
        overwrite=overwrite,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------- reading
def read_outline_samples(path: str | Path) -> list[OutlineSample]:
    """The parameters of an outlines set, from its folder or its prompt.json; sample i is line i.
    Raises ValueError naming the file and line of a line without them."""
    return read_records(path, OutlineSample.from_record, "outlines")


def is_outlines_set(path: str | Path) -> bool:
    """Whether a folder holds a set written by :func:`generate_outlines`."""
    from .pairset import read_options

    if not Path(path).is_dir():
        return False
    options = read_options(path)
    return options is not None and options.get("format") == GENERATOR_FORMAT


def samples_of(dataset: Any) -> list[OutlineSample]:
    """The shapes of each item of an opened outlines set (``controlnet.data.open_dataset``), in
    item order, matched through the items' target files. ValueError naming the set when it is not
    an outlines set or an item has no recorded shapes."""
    root = Path(dataset.root)
    if not is_outlines_set(root):
        raise ValueError(f"{root}: not a set written by `controlnet data outlines` (its generator.json)")
    by_target = {(root / f"target/{s.index}.png").resolve(): s for s in read_outline_samples(root)}
    out = []
    for entry in dataset.entries:
        sample = by_target.get(Path(entry.target).resolve())
        if sample is None:
            raise ValueError(f"{root}: {entry.where} has no recorded shapes")
        out.append(sample)
    return out


_NAMED = re.compile(
    rf"^(.+?)\s+({'|'.join(re.escape(n) for n in sorted(SHAPE_NAMES, key=len, reverse=True))})$"
)
_WHOLE = re.compile(r"^\s*(.+?)\s+with\s+(.+?)\s+background\s*$")


def parse_outline_prompt(prompt: str) -> tuple[list[tuple[str, str]], str]:
    """ "gold star, navy circle and red blob with white background" -> ([("gold", "star"), ("navy",
    "circle"), ("red", "blob")], "white"); colours in the table's spelling. Every fill50k prompt
    reads too. Raises ValueError otherwise."""
    m = _WHOLE.match(prompt.lower())
    if not m:
        raise ValueError(f"not an outlines prompt: {prompt!r}")
    head, *rest = m.group(1).rsplit(" and ", 1)
    parts = [p.strip() for p in head.split(",")] + [p.strip() for p in rest]
    shapes = []
    for part in parts:
        pm = _NAMED.match(part)
        if not pm:
            raise ValueError(f"not an outlines prompt: {prompt!r} ({part!r} names no shape)")
        shapes.append((color_name(pm.group(1)), pm.group(2)))
    return shapes, color_name(m.group(2))
