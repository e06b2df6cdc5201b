"""Structured data on disk -> condition maps: the renderers behind ``controlnet render``.

Kinds and inputs:

- ``pose``: OpenPose JSON (``people[].pose_keypoints_2d`` etc., pixel coordinates); the size is
  the file's ``canvas_width``/``canvas_height`` or ``width``/``height``.
- ``depth``: an HxW ``.npy`` array; ``depth_kind`` "inverse" (near = large) or "metric".
- ``normals``: an HxWx3 ``.npy`` array of unit normals (x, y, z); channel ``order``.
- ``labels``: an HxW integer ``.npy`` array, or a label image (grey value = class index).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .depth import depth_to_map
from .normal import normals_to_rgb
from .pose import draw_pose, people_from_openpose_json
from .segmentation import labels_to_colors
from .utils import hwc3

__all__ = ["RENDER_KINDS", "render_file"]

RENDER_KINDS = ("pose", "depth", "normals", "labels")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {path.name} as a .npy array ({e.__class__.__name__})") from None


def render_file(
    kind: str,
    path: str | os.PathLike[str],
    *,
    width: int | None = None,
    height: int | None = None,
    palette: str = "ade20k",
    depth_kind: str = "inverse",
    order: str = "xyz",
) -> np.ndarray:
    """Render the file at ``path`` as a ``kind`` map: HxWx3 uint8 RGB."""
    path = Path(path)
    if kind not in RENDER_KINDS:
        raise ValueError(f"unknown render kind {kind!r}; known: {', '.join(RENDER_KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if kind == "pose":
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path.name} as JSON text ({e.__class__.__name__})") from None
        people, w, h = people_from_openpose_json(text, width, height)
        return draw_pose(people, h, w)
    if kind == "depth":
        return hwc3(depth_to_map(_load_npy(path), depth_kind))
    if kind == "normals":
        n = _load_npy(path)
        if n.ndim != 3 or n.shape[2] != 3:
            raise ValueError(f"normals must be an HxWx3 array, got shape {n.shape}")
        return normals_to_rgb(n.astype(np.float32), order)
    if path.suffix == ".npy":
        labels = _load_npy(path)
    else:
        try:
            with Image.open(path) as im:
                labels = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I") else im)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read {path.name} as a label image ({e.__class__.__name__})") from None
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)  # whole numbers stored as floats
    return labels_to_colors(labels, palette)
