"""Straight line segments by the probabilistic Hough transform, drawn the M-LSD way.

The released M-LSD annotator draws each detected segment as a 1 px white line on black; the
mlsd models read that map. Here the segments come from a classical detector instead (no
weights): Canny edges, ``cv2.HoughLinesP``, then a merge of the near-duplicate segments Hough
returns for one straight edge (both sides of a stroke, a side split in pieces).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["detect_segments", "draw_segments", "hough_lines", "merge_segments"]


def detect_segments(
    image: np.ndarray,
    *,
    low_threshold: int = 50,
    high_threshold: int = 150,
    votes: int = 30,
    min_length: int = 20,
    max_gap: int = 5,
    merge: bool = True,
) -> np.ndarray:
    """Line segments of an HxWx3 uint8 image: (N, 4) float32 rows ``x1, y1, x2, y2`` in pixels.

    ``votes`` is the Hough accumulator threshold, ``min_length`` the shortest segment kept and
    ``max_gap`` the largest gap bridged along a line (pixels).
    """
    edges = cv2.Canny(image, low_threshold, high_threshold)
    found = cv2.HoughLinesP(
        edges, 1, np.pi / 180, threshold=votes, minLineLength=min_length, maxLineGap=max_gap
    )
    segs = np.zeros((0, 4), np.float32) if found is None else found.reshape(-1, 4).astype(np.float32)
    return merge_segments(segs, max_gap=max(max_gap, 2)) if merge else segs


def _compatible(
    lines: np.ndarray, seg: np.ndarray, angle_tol: float, dist_tol: float, max_gap: float
) -> np.ndarray:
    """For each row of ``lines`` (M, 4): does ``seg`` lie on it? (near-parallel, close across the
    line, and overlapping or within ``max_gap`` along it). Measured in each line's own frame."""
    start, d = lines[:, :2], lines[:, 2:] - lines[:, :2]
    length = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)
    u = d / length[:, None]
    normal = np.stack([-u[:, 1], u[:, 0]], 1)
    sd = seg[2:] - seg[:2]
    slen = max(float(np.hypot(*sd)), 1e-9)
    parallel = np.abs(u @ sd) / slen >= math.cos(math.radians(angle_tol))
    rel = np.stack([seg[:2] - start, seg[2:] - start], 1)  # (M, 2 ends, 2)
    across = np.abs(np.einsum("mej,mj->me", rel, normal)).max(1) <= dist_tol
    along = np.einsum("mej,mj->me", rel, u)
    overlap = (along.min(1) <= length + max_gap) & (along.max(1) >= -max_gap)
    return parallel & across & overlap


def _join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One segment spanning both, along ``a``'s direction, placed at their mean offset across it."""
    d = a[2:] - a[:2]
    u = d / max(float(np.hypot(*d)), 1e-9)
    n = np.array([-u[1], u[0]])
    pts = np.stack([a[:2], a[2:], b[:2], b[2:]]) - a[:2]
    t = pts @ u
    base = a[:2] + float(np.mean(pts @ n)) * n
    return np.concatenate([base + t.min() * u, base + t.max() * u])


def merge_segments(
    segments: np.ndarray, *, angle_tol: float = 3.0, dist_tol: float = 3.0, max_gap: float = 5.0
) -> np.ndarray:
    """Merge segments that lie on one line (angles within ``angle_tol`` degrees, within ``dist_tol``
    pixels of each other across the line, overlapping or ``max_gap`` apart along it).

    Greedy, longest first: each segment joins the first merged line it lies on, or starts a new
    one; passes repeat until nothing merges.
    """
    segs = np.asarray(segments, np.float64).reshape(-1, 4)
    while len(segs) > 1:
        order = np.argsort(-np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1]), kind="stable")
        out = np.empty_like(segs)
        n = 0
        for seg in segs[order]:
            hit = np.flatnonzero(_compatible(out[:n], seg, angle_tol, dist_tol, max_gap)) if n else []
            if len(hit):
                out[hit[0]] = _join(out[hit[0]], seg)
            else:
                out[n] = seg
                n += 1
        if n == len(segs):
            break
        segs = out[:n]
    return segs.astype(np.float32)


def draw_segments(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """An HxW uint8 map with each segment drawn as a 1 px white line (the M-LSD map convention)."""
    out = np.zeros((height, width), np.uint8)
    for x1, y1, x2, y2 in np.round(segments).astype(int):
        cv2.line(out, (x1, y1), (x2, y2), 255, 1)
    return out


def hough_lines(image: np.ndarray, **params: int | bool) -> np.ndarray:
    """HxWx3 uint8 image -> HxW map of its straight segments, white on black."""
    return draw_segments(detect_segments(image, **params), image.shape[0], image.shape[1])  # type: ignore[arg-type]


ENTRIES = (
    Annotator(
        name="lines",
        description="straight segments (Canny + probabilistic Hough), 1 px white on black (M-LSD maps)",
        fn=hough_lines,
        params=(
            Param("low_threshold", ParamType.INT, 50, "Canny low threshold", 1, 255),
            Param("high_threshold", ParamType.INT, 150, "Canny high threshold", 1, 255),
            Param("votes", ParamType.INT, 30, "Hough accumulator threshold", 1, 10000),
            Param("min_length", ParamType.INT, 20, "shortest segment kept (pixels)", 1, 10000),
            Param("max_gap", ParamType.INT, 5, "largest gap bridged along a line (pixels)", 0, 1000),
            Param("merge", ParamType.BOOL, True, "merge the duplicate segments of one straight edge"),
        ),
    ),
)
