"""Colour grid: each cell of the image filled with its mean colour (the T2I-Adapter colour map)."""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["color_grid"]


def color_grid(image: np.ndarray, cell: int = 64) -> np.ndarray:
    """HxWx3 uint8 -> HxWx3 uint8 palette grid: the image shrunk to (H/cell, W/cell) by area
    averaging, then enlarged back with nearest-neighbour, so each block is one colour."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // cell), max(1, h // cell)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


ENTRIES = (
    Annotator(
        name="color",
        description="colour grid: mean colour of each cell",
        fn=color_grid,
        params=(Param("cell", ParamType.INT, 64, "cell size (pixels)", 2, 1024),),
    ),
)
