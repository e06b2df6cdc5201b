"""Inpainting conditions: the image with the pixels to repaint marked.

``inpaint`` (the v1.1 inpainting ControlNet): the masked pixels set to -1.
-1 does not fit in uint8, so the map is RGBA: RGB is the image (black where masked) and alpha is
0 on the masked pixels, 255 elsewhere. :func:`controlnet.annotators.utils.condition_tensor` turns
alpha-0 pixels into -1 when the map becomes the model's input.

The mask arrives as the ``mask`` argument: an HxW array, bool (True = repaint) or uint8
(> 127 = repaint); an HxWx3 mask is reduced to its grey value. A mask of another size is resized
to the image with nearest-neighbour. On the command line: ``--mask MASK.png`` (white = repaint).

``repaint`` (xinsir's ProMax Union ControlNet, its repaint kind, and diffusers' Union inpainting
recipe): the masked pixels set to 0 - black, an ordinary RGB map. Outpainting is the same map
with the canvas grown: with ``--resize-mode fill`` the padding around the image is black and, with
the request's mask, regenerated.
"""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator

__all__ = ["as_mask", "inpaint", "repaint"]


def as_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Any supported mask -> HxW bool at (height, width)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.ndim != 2:
        raise ValueError(f"the mask must be an HxW array, got shape {m.shape}")
    m = m.astype(bool) if m.dtype == bool else (m > (0.5 if m.dtype.kind == "f" else 127))
    if m.shape != (height, width):
        m = cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return m


def inpaint(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 + mask -> HxWx4 uint8: RGB = image (0 where masked), alpha = 0 where masked."""
    if mask is None:
        raise ValueError("inpaint needs a mask: an HxW array (True or > 127 = pixels to repaint)")
    m = as_mask(mask, *image.shape[:2])
    out = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    out[m] = 0
    return out


def repaint(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 + mask -> HxWx3 uint8: the image, black where masked."""
    if mask is None:
        raise ValueError("repaint needs a mask: an HxW array (True or > 127 = pixels to repaint)")
    out = np.array(image[..., :3], copy=True)
    out[as_mask(mask, *image.shape[:2])] = 0
    return out


ENTRIES = (
    Annotator(
        name="inpaint",
        description="inpainting: RGBA map, alpha 0 on masked pixels (fed to the model as -1); needs a mask",
        fn=inpaint,
        inputs=("mask",),
    ),
    Annotator(
        name="repaint",
        description="repaint (Union ProMax in/outpainting): the image, black on masked pixels; needs a mask",
        fn=repaint,
        inputs=("mask",),
        pad=0.0,
    ),
)
