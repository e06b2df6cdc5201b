"""Soft edges by a classical detector, and the "safe" quantisation of soft-edge maps.

The released soft-edge annotators (HED, PiDiNet) give a grey-level edge probability. This one
needs no weights: the colour gradient magnitude at three scales (sigma, 2 sigma, 4 sigma),
scale-normalised so a step edge gives the same peak at every scale, the strongest scale kept per
pixel, then squashed by ``1 - exp(-3 r)`` so full-contrast edges saturate and faint ones stay grey.
The learned HED detector lives in :mod:`controlnet.annotators.hed`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["safe_step", "soft_edges", "soft_edges_map"]

# Sobel (ksize 3) of a unit step blurred by a Gaussian of sigma s peaks at 8 / (sqrt(2 pi) s).
_STEP_PEAK = 8.0 / math.sqrt(2.0 * math.pi)


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """The "safe" quantisation of the released soft-edge annotators: ``floor(x * (step + 1)) / step``
    clipped to [0, 1]; with step 2 a [0, 1] map keeps three levels, 0, 0.5 and 1."""
    y = np.floor(x.astype(np.float32) * float(step + 1)) / float(step)
    return y.clip(0.0, 1.0)


def soft_edges(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW float32 edge strength in [0, 1]."""
    x = image.astype(np.float32) / 255.0
    strength = np.zeros(image.shape[:2], np.float32)
    for s in (sigma, 2.0 * sigma, 4.0 * sigma):
        b = cv2.GaussianBlur(x, (0, 0), s)
        gx = cv2.Sobel(b, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(b, cv2.CV_32F, 0, 1, ksize=3)
        mag = np.sqrt(gx * gx + gy * gy).max(axis=2) * (s / _STEP_PEAK)
        np.maximum(strength, mag, out=strength)
    return 1.0 - np.exp(-3.0 * strength)


def soft_edges_map(image: np.ndarray, sigma: float = 1.0, safe: bool = False) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW uint8 soft-edge map (``safe``: quantised to 0/127/255)."""
    return edge_map(soft_edges(image, sigma), safe)


def edge_map(edge: np.ndarray, safe: bool = False) -> np.ndarray:
    """Edge strengths in [0, 1] -> HxW uint8 map (``safe``: quantised to 0/127/255 first)."""
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


ENTRIES = (
    Annotator(
        name="softedge",
        description="soft edges by a classical multi-scale gradient detector, grey on black (no weights)",
        fn=soft_edges_map,
        params=(
            Param("sigma", ParamType.FLOAT, 1.0, "finest Gaussian scale (pixels)", 0.3, 20.0),
            Param("safe", ParamType.BOOL, False, "quantise to three levels (the 'safe' variants)"),
        ),
    ),
)
