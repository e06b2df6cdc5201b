"""Line art: dark lines on white, the v1.1 line-art convention.

The v1.1 line-art detectors draw dark lines on a white page and the model is fed ``1 - map``
(its entry has ``model_invert=True``; :func:`controlnet.annotators.utils.condition_tensor` does
the flip). This detector is classical: a pixel is "ink" by how much darker it is than its
Gaussian-blurred surroundings, normalised by the median darkness of the inked pixels (that much
or darker is drawn black, fainter strokes grey).
"""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["lineart"]


def lineart(image: np.ndarray, sigma: float = 6.0, threshold: int = 8) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW uint8, dark lines (0) on white (255).

    ``sigma``: the blur scale that defines "surroundings" (pixels); ``threshold``: darkness below
    this many grey levels is paper, not ink.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    darkness = (cv2.GaussianBlur(grey, (0, 0), sigma) - grey).clip(0, 255)
    darkness[darkness < threshold] = 0
    inked = darkness[darkness > 0]
    scale = max(16.0, float(np.median(inked))) if inked.size else 16.0
    ink = (darkness / scale).clip(0, 1)  # ink as dark as the median inked pixel or darker is black
    return (255.0 * (1.0 - ink)).round().astype(np.uint8)


ENTRIES = (
    Annotator(
        name="lineart",
        description="line art, dark lines on white (the model reads 1 - map, as in v1.1)",
        fn=lineart,
        params=(
            Param("sigma", ParamType.FLOAT, 6.0, "blur scale defining the surroundings (pixels)", 0.5, 50.0),
            Param(
                "threshold", ParamType.INT, 8, "darkness (grey levels) below which a pixel is paper", 0, 255
            ),
        ),
        model_invert=True,
    ),
)
