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


def _same_line(a: np.ndarray, b: np.ndarray, angle_tol: float, dist_tol: float, max_gap: float) -> bool:
    da, db = a[2:] - a[:2], b[2:] - b[:2]
    la, lb = float(np.hypot(*da)), float(np.hypot(*db))
    if la == 0 or lb == 0:
        return True
    ua = da / la
    cos = abs(float(ua @ db)) / lb
    if cos < math.cos(math.radians(angle_tol)):
        return False
    normal = np.array([-ua[1], ua[0]])
    if max(abs(float(normal @ (b[:2] - a[:2]))), abs(float(normal @ (b[2:] - a[:2])))) > dist_tol:
        return False
    tb = sorted((float(ua @ (b[:2] - a[:2])), float(ua @ (b[2:] - a[:2]))))
    return tb[0] <= la + max_gap and tb[1] >= -max_gap  # overlapping or close along the line


def _join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One segment spanning both, along the longer one's direction."""
    if np.hypot(*(b[2:] - b[:2])) > np.hypot(*(a[2:] - a[:2])):
        a, b = b, a
    d = a[2:] - a[:2]
    u = d / max(float(np.hypot(*d)), 1e-9)
    pts = np.stack([a[:2], a[2:], b[:2], b[2:]])
    t = (pts - a[:2]) @ u
    offset = float(np.mean((pts - a[:2]) @ np.array([-u[1], u[0]])))
    base = a[:2] + offset * np.array([-u[1], u[0]])
    return np.concatenate([base + t.min() * u, base + t.max() * u]).astype(np.float32)


def merge_segments(
    segments: np.ndarray, *, angle_tol: float = 3.0, dist_tol: float = 3.0, max_gap: float = 5.0
) -> np.ndarray:
    """Merge segments that lie on one line (angles within ``angle_tol`` degrees, within ``dist_tol``
    pixels of each other across the line, overlapping or ``max_gap`` apart along it)."""
    segs = [s.astype(np.float64) for s in segments]
    merged = True
    while merged:
        merged = False
        for i in range(len(segs)):
            for j in range(i + 1, len(segs)):
                if _same_line(segs[i], segs[j], angle_tol, dist_tol, max_gap):
                    segs[i] = _join(segs[i], segs[j])
                    del segs[j]
                    merged = True
                    break
            if merged:
                break
    return np.array(segs, np.float32).reshape(-1, 4)


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
