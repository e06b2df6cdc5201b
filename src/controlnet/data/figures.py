"""Closed shapes of six kinds as exact polygons: what the outlines world (:mod:`.outlines`) draws.

A :class:`Figure` is a kind (circle, ellipse, regular polygon, star, rounded rectangle, irregular
blob), a centre, a radius (the largest distance from the centre to the outline), a rotation and a
few numbers of the kind's own. Curves are sampled at 128 points; vertices go to OpenCV's integer
rasteriser at 1/16 pixel with no anti-aliasing, so a figure's pixels are a pure function of its
numbers. Pixel ``(row y, column x)`` has its centre at ``(x, y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import cv2
import numpy as np

from .colors import color_name, rgb

__all__ = [
    "SHAPE_NAMES",
    "Figure",
    "FigureKind",
    "area",
    "fill_mask",
    "fixed_point",
    "inradius",
    "random_detail",
]

SHIFT = 4  # OpenCV fixed point: vertices to 1/16 pixel
_CURVE_POINTS = 128
_POLYGON_NAMES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon"}
#: every word a prompt may use for a figure
SHAPE_NAMES = (*_POLYGON_NAMES.values(), "circle", "ellipse", "star", "rounded rectangle", "blob")


class FigureKind(Enum):
    CIRCLE = "circle"
    ELLIPSE = "ellipse"
    POLYGON = "polygon"
    STAR = "star"
    ROUNDED = "rounded"
    BLOB = "blob"


@dataclass(frozen=True)
class Figure:
    """One shape. ``radius``: the largest distance from ``center`` to the outline's centre line;
    ``rotation``: degrees, clockwise on screen; ``detail``: the kind's own numbers (polygon: sides;
    star: points, inner radius ratio; ellipse: axis ratio; rounded: axis ratio, corner ratio; blob:
    per harmonic 2..5 its amplitude and phase)."""

    kind: FigureKind
    center: tuple[float, float]
    radius: float
    rotation: float
    color: str
    detail: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        """The word the prompt uses."""
        if self.kind is FigureKind.POLYGON:
            return _POLYGON_NAMES[int(self.detail[0])]
        return "rounded rectangle" if self.kind is FigureKind.ROUNDED else self.kind.value

    def vertices(self) -> np.ndarray:
        """(k, 2) float64 polygon vertices (x, y) in image pixels."""
        v = unit_outline(self.kind, self.detail) * self.radius
        a = math.radians(self.rotation)
        c, s = math.cos(a), math.sin(a)
        return v @ np.array([[c, s], [-s, c]]) + np.asarray(self.center)

    def rounded(self) -> Figure:
        """The figure with its numbers as the record keeps them (4 decimals; 6 for ``detail``): a
        generated figure is rounded before it is drawn, so its record redraws it exactly."""
        return Figure(
            self.kind,
            (round(self.center[0], 4), round(self.center[1], 4)),
            round(self.radius, 4),
            round(self.rotation, 4),
            self.color,
            tuple(round(d, 6) for d in self.detail),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "center": list(self.center),
            "radius": self.radius,
            "rotation": self.rotation,
            "color": self.color,
            "color_rgb": list(rgb(self.color)),
            "detail": list(self.detail),
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Figure:
        return cls(
            kind=FigureKind(r["kind"]),
            center=(float(r["center"][0]), float(r["center"][1])),
            radius=float(r["radius"]),
            rotation=float(r["rotation"]),
            color=color_name(r["color"]),
            detail=tuple(float(d) for d in r["detail"]),
        )


def unit_outline(kind: FigureKind, detail: tuple[float, ...]) -> np.ndarray:
    """The kind's outline at radius 1 about the origin, unrotated: (k, 2) vertices (x, y)."""
    t = 2 * np.pi * np.arange(_CURVE_POINTS) / _CURVE_POINTS
    if kind is FigureKind.CIRCLE:
        return np.stack([np.cos(t), np.sin(t)], -1)
    if kind is FigureKind.ELLIPSE:
        return np.stack([np.cos(t), detail[0] * np.sin(t)], -1)
    if kind is FigureKind.POLYGON:
        k = int(detail[0])
        a = -np.pi / 2 + 2 * np.pi * np.arange(k) / k
        return np.stack([np.cos(a), np.sin(a)], -1)
    if kind is FigureKind.STAR:
        k, inner = int(detail[0]), detail[1]
        a = -np.pi / 2 + np.pi * np.arange(2 * k) / k
        r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(a), r * np.sin(a)], -1)
    if kind is FigureKind.ROUNDED:
        aspect, corner = detail
        w, h = 1.0, aspect  # half-sides; scaled below so that the farthest point is at 1
        c = corner * min(w, h)
        q = np.linspace(0, np.pi / 2, _CURVE_POINTS // 4)
        pts = []
        for (sx, sy), start in zip(((1, 1), (-1, 1), (-1, -1), (1, -1)), (0, 1, 2, 3)):
            ang = q + start * np.pi / 2
            pts.append(np.stack([sx * (w - c) + c * np.cos(ang), sy * (h - c) + c * np.sin(ang)], -1))
        v = np.concatenate(pts)
        return v / np.hypot(v[:, 0], v[:, 1]).max()
    # blob: a radius that wanders smoothly with the angle
    r = np.ones_like(t)
    for k, (amp, phase) in enumerate(zip(detail[0::2], detail[1::2]), start=2):
        r = r + amp * np.cos(k * t + phase)
    r = r / r.max()
    return np.stack([r * np.cos(t), r * np.sin(t)], -1)


def fixed_point(vertices: np.ndarray) -> np.ndarray:
    return np.round(vertices * (1 << SHIFT)).astype(np.int32)


def fill_mask(figure: Figure, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [fixed_point(figure.vertices())], 1, lineType=cv2.LINE_8, shift=SHIFT)
    return mask.astype(bool)


def inradius(figure: Figure) -> float:
    """Distance from the centre to the nearest point of the outline."""
    v = figure.vertices() - np.asarray(figure.center)
    e = np.roll(v, -1, axis=0) - v
    t = np.clip(-(v * e).sum(1) / np.maximum((e * e).sum(1), 1e-12), 0.0, 1.0)
    return float(np.hypot(*(v + t[:, None] * e).T).min())


def area(f: Figure) -> float:
    x, y = f.vertices().T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def random_detail(kind: FigureKind, rng: np.random.Generator) -> tuple[float, ...]:
    if kind is FigureKind.ELLIPSE:
        return (float(rng.uniform(0.3, 0.8)),)
    if kind is FigureKind.POLYGON:
        return (float(rng.integers(3, 9)),)
    if kind is FigureKind.STAR:
        return (float(rng.integers(4, 9)), float(rng.uniform(0.35, 0.6)))
    if kind is FigureKind.ROUNDED:
        return (float(rng.uniform(0.4, 1.0)), float(rng.uniform(0.2, 0.7)))
    if kind is FigureKind.BLOB:
        out: list[float] = []
        for k in range(2, 6):
            out += [float(rng.uniform(0.0, 0.3) / math.sqrt(k - 1)), float(rng.uniform(0.0, 2 * np.pi))]
        return tuple(out)
    return ()
