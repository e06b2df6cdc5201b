"""Pixel-wise conditions: invert and binary threshold."""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["binary", "invert"]


def invert(image: np.ndarray) -> np.ndarray:
    """255 - image: e.g. a black-on-white line drawing becomes white lines on black."""
    return 255 - image


def binary(image: np.ndarray, threshold: int = 0, invert: bool = False) -> np.ndarray:
    """Grey value > ``threshold`` -> 255, else 0 (``invert`` swaps them); threshold 0 picks Otsu's.

    Returns an HxW uint8 map.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mode = cv2.THRESH_BINARY_INV if invert else cv2.THRESH_BINARY
    if threshold == 0:
        _, out = cv2.threshold(grey, 0, 255, mode | cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(grey, threshold, 255, mode)
    return out


ENTRIES = (
    Annotator(
        name="invert", description="255 - image (black-on-white drawings to white-on-black)", fn=invert
    ),
    Annotator(
        name="binary",
        description="binary threshold of the grey image",
        fn=binary,
        params=(
            Param("threshold", ParamType.INT, 0, "grey level; 0 = Otsu's automatic threshold", 0, 254),
            Param("invert", ParamType.BOOL, False, "dark pixels become white instead"),
        ),
    ),
)
