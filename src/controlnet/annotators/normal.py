"""Normal maps: from depth the v1.0 way, and unit normal vectors to RGB.

v1.0 (``normal_midas``): with ``d`` the estimator's relative inverse depth (near = large),
x = Sobel_x(d), y = Sobel_y(d), z = a (2 pi by default); x and y are zeroed where the min-max
normalised depth is below the background threshold (0.4 in the app), then each vector is
L2-normalised and mapped to 8 bits by ``n * 127.5 + 127.5``.

Channel order: the v1.0 app fed its normal model the (x, y, z) map with its channels reversed
(RGB = z, y, x), so the registry entries default to ``order="zyx"``; ``order="xyz"`` gives the
plain RGB = (x, y, z) normal map.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["depth_to_normal", "normal_from_depth_map", "normals_to_rgb", "rgb_to_normals"]

ORDERS = ("zyx", "xyz")


def depth_to_normal(depth: np.ndarray, *, z: float = 2.0 * math.pi, bg_threshold: float = 0.4) -> np.ndarray:
    """HxW depth (near = large values, any units) -> HxWx3 float32 unit normals (x, y, z).

    Background pixels (normalised depth < ``bg_threshold``) get the flat normal (0, 0, 1).
    """
    d = np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    span = float(d.max() - d.min())
    norm = (d - d.min()) / span if span > 0 else np.ones_like(d)  # a flat depth is all foreground
    nx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    ny = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    background = norm < bg_threshold
    nx[background] = 0.0
    ny[background] = 0.0
    n = np.stack([nx, ny, np.full_like(nx, z)], axis=2)
    return n / np.linalg.norm(n, axis=2, keepdims=True)


def normals_to_rgb(normals: np.ndarray, order: str = "xyz") -> np.ndarray:
    """HxWx3 unit normals (x, y, z) -> HxWx3 uint8 via ``n * 127.5 + 127.5``, channels in ``order``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    rgb = (normals * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    return rgb[:, :, ::-1].copy() if order == "zyx" else rgb


def rgb_to_normals(rgb: np.ndarray, order: str = "xyz") -> np.ndarray:
    """The inverse of :func:`normals_to_rgb` (to 8-bit precision): HxWx3 float32 (x, y, z)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    n = rgb.astype(np.float32) / 127.5 - 1.0
    return n[:, :, ::-1].copy() if order == "zyx" else n


def normal_from_depth_map(
    image: np.ndarray, z: float = 2.0 * math.pi, bg_threshold: float = 0.4, order: str = "zyx"
) -> np.ndarray:
    """An 8-bit depth map (near = bright; the grey value is the depth) -> normal map."""
    depth = image.astype(np.float32).mean(axis=2)
    return normals_to_rgb(depth_to_normal(depth, z=z, bg_threshold=bg_threshold), order)


def normal_params() -> tuple[Param, ...]:
    """The parameters shared by the normal-map entries."""
    return (
        Param("z", ParamType.FLOAT, 2.0 * math.pi, "z component before normalising (depth units)", 1e-3, 1e6),
        Param(
            "bg_threshold", ParamType.FLOAT, 0.4, "normalised depth below this is flat background", 0.0, 1.0
        ),
        Param(
            "order",
            ParamType.CHOICE,
            "zyx",
            "channel order: zyx as the v1.0 model was fed, xyz plain",
            choices=ORDERS,
        ),
    )


ENTRIES = (
    Annotator(
        name="normal_from_depth",
        description="normal map from an 8-bit depth map (near bright), the v1.0 Sobel way",
        fn=normal_from_depth_map,
        params=normal_params(),
    ),
)
