"""Scribbles: a user's drawing, or "fake scribbles" made from soft edges.

The scribble models read white strokes on black. A user draws black on white, so
:func:`scribble` thresholds and inverts. :func:`fake_scribble` turns a soft-edge map into
scribble-like strokes the way the v1.0 app did: non-maximum suppression (thin the edges),
Gaussian blur (thicken them again, evenly), then a low threshold.
"""

from __future__ import annotations

import cv2
import numpy as np

from .hed import WEIGHTS, hed_edges
from .registry import Annotator, Param, ParamType
from .softedge import soft_edges

__all__ = ["fake_scribble", "nms", "scribble", "scribble_from_edges", "scribble_hed"]

# 3x3 line kernels: horizontal, vertical and the two diagonals.
_DIRECTIONS = (
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8),
    np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.uint8),
)


def scribble(image: np.ndarray, threshold: int = 127) -> np.ndarray:
    """A black-on-white drawing -> white-on-black strokes (HxW uint8): a pixel is a stroke when its
    darkest channel is below ``threshold``."""
    return np.where(image.min(axis=2) < threshold, 255, 0).astype(np.uint8)


def nms(edges: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Thin a grey edge map (values 0..255): blur with ``sigma``, keep pixels that are a maximum
    along at least one of four directions and exceed ``threshold``. Returns HxW uint8 (0/255)."""
    x = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    ridge = np.zeros(x.shape, bool)
    for kernel in _DIRECTIONS:
        ridge |= cv2.dilate(x, kernel) == x
    return np.where(ridge & (x > threshold), 255, 0).astype(np.uint8)


def scribble_from_edges(
    edges: np.ndarray, nms_threshold: float = 127, nms_sigma: float = 3.0, blur: float = 3.0
) -> np.ndarray:
    """HxW uint8 soft edges -> HxW uint8 scribble (the v1.0 fake-scribble recipe)."""
    thin = nms(edges, nms_threshold, nms_sigma)
    thick = cv2.GaussianBlur(thin, (0, 0), blur)
    return np.where(thick > 4, 255, 0).astype(np.uint8)


def fake_scribble(
    image: np.ndarray, sigma: float = 1.0, nms_threshold: int = 127, blur: float = 3.0
) -> np.ndarray:
    """HxWx3 uint8 photo -> HxW uint8 scribble from the classical soft edges."""
    edges = (soft_edges(image, sigma) * 255.0).astype(np.uint8)
    return scribble_from_edges(edges, nms_threshold, 3.0, blur)


def scribble_hed(image: np.ndarray, weights: str = "ControlNetHED.pth", blur: float = 3.0) -> np.ndarray:
    """HxWx3 uint8 photo -> HxW uint8 scribble from HED soft edges (the v1.0 fake-scribble app)."""
    edges = (hed_edges(image, weights) * 255.0).clip(0, 255).astype(np.uint8)
    return scribble_from_edges(edges, 127, 3.0, blur)


_BLUR = Param("blur", ParamType.FLOAT, 3.0, "stroke thickening blur sigma (pixels)", 0.5, 20.0)

ENTRIES = (
    Annotator(
        name="scribble",
        description="a black-on-white drawing as white strokes on black",
        fn=scribble,
        params=(Param("threshold", ParamType.INT, 127, "darkest channel below this is a stroke", 1, 255),),
    ),
    Annotator(
        name="fake_scribble",
        description="scribble from classical soft edges (NMS, blur, threshold), white on black",
        fn=fake_scribble,
        params=(
            Param("sigma", ParamType.FLOAT, 1.0, "soft-edge scale (pixels)", 0.3, 20.0),
            Param("nms_threshold", ParamType.INT, 127, "edge strength kept after thinning", 0, 254),
            _BLUR,
        ),
    ),
    Annotator(
        name="scribble_hed",
        description="scribble from HED soft edges (the v1.0 fake-scribble recipe), white on black",
        fn=scribble_hed,
        params=(WEIGHTS, _BLUR),
        needs_weights=True,
    ),
)
