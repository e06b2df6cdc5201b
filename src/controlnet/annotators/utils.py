"""Image utilities shared by every annotator: channel normalisation, resizing, the model tensor.

Conventions (those of the released ControlNet apps):

- Images and condition maps are numpy arrays, HxWx3 uint8 RGB. Grey maps are repeated to three
  channels; RGBA images are composited over white (:func:`hwc3`).
- Resizing keeps the aspect ratio, sets the short side to the resolution and rounds both sides to
  multiples of 64 (:func:`resize_for_model`); shrinking uses area averaging, enlarging Lanczos,
  and label or pose maps use nearest-neighbour so no new colours appear.
- Images of another aspect than the output are stretched, cropped or padded to it
  (:func:`fit_to`, :class:`ResizeMode`); the released apps stretched.
- Inpainting maps are RGBA: alpha 0 marks the masked pixels, which :func:`condition_tensor` turns
  into -1 (the v1.1 inpaint model's convention).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ..choices import ResizeMode

__all__ = [
    "condition_tensor",
    "fill_box",
    "fit_to",
    "hwc3",
    "model_size",
    "resize_center_crop",
    "resize_for_detection",
    "resize_for_model",
    "resize_to",
]


def hwc3(x: np.ndarray) -> np.ndarray:
    """A uint8 image as HxWx3: grey (HxW or HxWx1) is repeated, RGBA is composited over white."""
    if x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {x.shape}")
    c = x.shape[2]
    if c == 3:
        return x
    if c == 1:
        return np.repeat(x, 3, axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def model_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) with the short side scaled to ``resolution``, each rounded to a multiple of 64 (>= 64)."""
    if resolution < 64:
        raise ValueError(f"resolution must be at least 64, got {resolution}")
    k = resolution / min(height, width)
    return max(64, round(height * k / 64) * 64), max(64, round(width * k / 64) * 64)


def resize_to(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize to exactly (H, W): area when shrinking, Lanczos when growing, nearest for label and
    pose maps (their colours are codes, not intensities); an alpha channel always with nearest."""
    h, w = size
    if (h, w) == image.shape[:2]:
        return image.copy()
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if h * w < image.shape[0] * image.shape[1] else cv2.INTER_LANCZOS4
    if image.ndim == 3 and image.shape[2] == 4:  # the mask channel never blends
        rgb = cv2.resize(np.ascontiguousarray(image[:, :, :3]), (w, h), interpolation=interp)
        alpha = cv2.resize(np.ascontiguousarray(image[:, :, 3]), (w, h), interpolation=cv2.INTER_NEAREST)
        return np.dstack([rgb, alpha])
    out = cv2.resize(image, (w, h), interpolation=interp)
    return out[:, :, None] if image.ndim == 3 and out.ndim == 2 else out


def resize_for_model(image: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
    """Resize to the model's size: short side = ``resolution``, sides multiples of 64, aspect kept.

    Shrinking uses INTER_AREA, enlarging INTER_LANCZOS4; ``nearest`` (label and pose maps) uses
    INTER_NEAREST. An alpha channel (inpainting masks) is always resized with nearest.
    """
    return resize_to(image, model_size(image.shape[0], image.shape[1], resolution), nearest)


def fill_box(image_hw: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where :data:`ResizeMode.FILL` puts an image of ``image_hw`` on a canvas of ``size``:
    (height, width, top, left) of the scaled image, centred, touching two opposite sides."""
    (h, w), (out_h, out_w) = image_hw, size
    scale = min(out_h / h, out_w / w)
    nh, nw = min(out_h, max(1, round(h * scale))), min(out_w, max(1, round(w * scale)))
    return nh, nw, (out_h - nh) // 2, (out_w - nw) // 2


def _border_colour(image: np.ndarray, nearest: bool) -> np.ndarray:
    """The colour to pad ``image`` with: its border's most common colour for maps of codes
    (``nearest``: labels, poses), the per-channel median otherwise. An RGBA map pads as 0 (no
    condition there: an inpainting map's pixels to generate, drawn black)."""
    if image.ndim == 3 and image.shape[2] == 4:
        return np.zeros(4, image.dtype)
    pixels = image.reshape(image.shape[0], image.shape[1], -1)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if nearest:
        colours, counts = np.unique(border, axis=0, return_counts=True)
        return colours[counts.argmax()]
    return np.median(border, axis=0).round().astype(image.dtype)


def fit_to(
    image: np.ndarray,
    size: tuple[int, int],
    mode: ResizeMode | str = ResizeMode.STRETCH,
    *,
    nearest: bool = False,
    fill: float | None = None,
) -> np.ndarray:
    """``image`` (HxW or HxWxC) at exactly ``size`` = (H, W), by ``mode`` (:class:`ResizeMode`),
    resampled as :func:`resize_to`. FILL pads with the value ``fill`` when given, else with the
    image's border colour (see :func:`_border_colour`)."""
    mode = ResizeMode(mode)
    out_h, out_w = size
    h, w = image.shape[:2]
    if mode is ResizeMode.STRETCH:
        return resize_to(image, size, nearest)
    if mode is ResizeMode.CROP:
        scale = max(out_h / h, out_w / w)
        nh, nw = max(out_h, round(h * scale)), max(out_w, round(w * scale))
        image = resize_to(image, (nh, nw), nearest)
        top, left = (nh - out_h) // 2, (nw - out_w) // 2
        return np.ascontiguousarray(image[top : top + out_h, left : left + out_w])
    nh, nw, top, left = fill_box((h, w), size)
    inner = resize_to(image, (nh, nw), nearest)
    colour = _border_colour(inner, nearest) if fill is None else fill
    out = np.empty((out_h, out_w, *image.shape[2:]), image.dtype)
    out[...] = colour
    out[top : top + nh, left : left + nw] = inner
    return out


def resize_center_crop(image: np.ndarray, resolution: int, *, nearest: bool = False) -> np.ndarray:
    """Resize so the short side is ``resolution`` (as :func:`resize_to`), then crop the centre
    square. Images of one size always get the same geometry, so a training target and its
    condition stay aligned pixel for pixel."""
    return fit_to(image, (resolution, resolution), ResizeMode.CROP, nearest=nearest)


def resize_for_detection(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize an input photo before an annotator runs on it (the apps' ``detect_resolution``).

    The same rule as :func:`resize_for_model` (short side, multiples of 64, area down / Lanczos
    up): the released annotators were run on images sized this way.
    """
    return resize_for_model(image, resolution)


def condition_tensor(cond: np.ndarray, invert: bool = False) -> torch.Tensor:
    """A condition map as the model reads it: (1, C, H, W) float32.

    RGB values map to [0, 1] (``invert``: ``1 - x``, for v1.1 line art). For an RGBA inpainting
    map the result has C = 3 and the pixels whose alpha is 0 are set to -1.
    """
    if cond.ndim == 3 and cond.shape[2] == 4:
        rgb, masked = cond[:, :, :3], cond[:, :, 3] == 0
    else:
        rgb, masked = hwc3(cond), None
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)
    if invert:
        x = 1.0 - x
    if masked is not None:
        x[torch.from_numpy(masked)] = -1.0
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()
