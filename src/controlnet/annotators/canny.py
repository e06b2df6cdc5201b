"""Canny edges (``cv2.Canny``): white edges on black, the condition of the canny models."""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["canny"]


def canny(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW uint8 edge map (255 on edges), exactly ``cv2.Canny`` of the image."""
    return cv2.Canny(image, low_threshold, high_threshold)


ENTRIES = (
    Annotator(
        name="canny",
        description="Canny edges, white on black",
        fn=canny,
        params=(
            Param("low_threshold", ParamType.INT, 100, "hysteresis low threshold", 1, 255),
            Param("high_threshold", ParamType.INT, 200, "hysteresis high threshold", 1, 255),
        ),
    ),
)
