"""Tile (v1.1): the image itself, optionally down-sampled and blurred, as the condition."""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["tile"]


def tile(image: np.ndarray, downsample: float = 1.0, blur: float = 0.0) -> np.ndarray:
    """HxWx3 uint8 -> HxWx3 uint8: shrunk by ``downsample`` (area) and enlarged back (bicubic),
    then Gaussian-blurred with sigma ``blur`` (pixels; 0 = none). Same size as the input."""
    h, w = image.shape[:2]
    out = image
    if downsample > 1.0:
        small = (max(1, round(w / downsample)), max(1, round(h / downsample)))
        out = cv2.resize(
            cv2.resize(out, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC
        )
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    return out.copy() if out is image else out


ENTRIES = (
    Annotator(
        name="tile",
        description="tile: the image down-sampled and/or blurred (v1.1 tile model)",
        fn=tile,
        params=(
            Param("downsample", ParamType.FLOAT, 1.0, "shrink factor before enlarging back", 1.0, 64.0),
            Param("blur", ParamType.FLOAT, 0.0, "Gaussian blur sigma (pixels), 0 = none", 0.0, 100.0),
        ),
    ),
)
