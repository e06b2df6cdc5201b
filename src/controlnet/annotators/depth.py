"""Depth maps: depth arrays to 8-bit maps (near = bright), and the learned depth estimators.

Relative estimators (MiDaS/DPT, Depth Anything) predict inverse depth (near = large), mapped by
min-max to [0, 255], as the released MiDaS annotator does. Metric depth (distance, near = small)
is mapped the ZoeDepth annotator's way: the 2nd..85th percentiles stretched to [0, 1], inverted.

Estimators are transformers models in a local folder (see :mod:`controlnet.annotators.hf`):
DPTForDepthEstimation (e.g. Intel/dpt-hybrid-midas, the transformers conversion of the
released dpt_hybrid-midas-501f0c75.pt) or DepthAnythingForDepthEstimation
(e.g. LiheYoung/depth-anything-small-hf).
"""

from __future__ import annotations

import math

import numpy as np

from .hf import load_estimator, run_estimator
from .normal import depth_to_normal, normal_params, normals_to_rgb
from .registry import Annotator, Param, ParamType

__all__ = ["depth_to_map", "estimate_depth"]

KINDS = ("inverse", "metric")
MIDAS_GET = (
    "a transformers DPT depth folder such as Intel/dpt-hybrid-midas "
    "(transformers' conversion of dpt_hybrid-midas-501f0c75.pt)"
)
ANYTHING_GET = "a transformers Depth Anything folder such as LiheYoung/depth-anything-small-hf"


def depth_to_map(depth: np.ndarray, kind: str = "inverse") -> np.ndarray:
    """HxW depth -> HxW uint8 map, near = bright. Non-finite values become 0 (far).

    kind "inverse": inverse depth / disparity (near = large), min-max normalised.
    kind "metric": distance (near = small): the 2nd and 85th percentiles map to 1 and 0.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    d = np.asarray(depth, np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must be an HxW array, got shape {d.shape}")
    valid = np.isfinite(d)
    out = np.zeros(d.shape)
    if valid.any():
        v = d[valid]
        lo, hi = (v.min(), v.max()) if kind == "inverse" else np.percentile(v, [2, 85])
        x = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
        out = x if kind == "inverse" else 1.0 - x
        out[~valid] = 0.0
    return (out * 255.0).clip(0, 255).astype(np.uint8)


def estimate_depth(image: np.ndarray, weights: str, *, get: str = MIDAS_GET) -> tuple[np.ndarray, str]:
    """(HxW float32 depth, kind) from a local transformers depth folder; kind as in :func:`depth_to_map`."""
    model, prep = load_estimator(weights, "depth", what="depth estimator", get=get)
    depth = run_estimator(image, model, prep).numpy()
    metric = getattr(model.config, "depth_estimation_type", "relative") == "metric"
    return depth, "metric" if metric else "inverse"


def depth_midas(image: np.ndarray, weights: str = "dpt-hybrid-midas") -> np.ndarray:
    return depth_to_map(*estimate_depth(image, weights))


def depth_anything(image: np.ndarray, weights: str = "depth-anything-small-hf") -> np.ndarray:
    return depth_to_map(*estimate_depth(image, weights, get=ANYTHING_GET))


def normal_midas(
    image: np.ndarray,
    weights: str = "dpt-hybrid-midas",
    z: float = 2.0 * math.pi,
    bg_threshold: float = 0.4,
    order: str = "zyx",
) -> np.ndarray:
    """The v1.0 normal annotator: estimated inverse depth -> Sobel normals -> RGB."""
    depth, kind = estimate_depth(image, weights)
    if kind == "metric":  # the v1.0 formula expects near = large
        depth = 1.0 / np.maximum(depth, 1e-6)
    return normals_to_rgb(depth_to_normal(depth, z=z, bg_threshold=bg_threshold), order)


def _weights(default: str, get: str) -> Param:
    return Param("weights", ParamType.STR, default, f"{get}: folder name in the annotator folder, or a path")


ENTRIES = (
    Annotator(
        name="depth_midas",
        description="depth by a DPT/MiDaS estimator (transformers folder), near bright",
        fn=depth_midas,
        params=(_weights("dpt-hybrid-midas", MIDAS_GET),),
        needs_weights=True,
    ),
    Annotator(
        name="depth_anything",
        description="depth by a Depth Anything estimator (transformers folder), near bright",
        fn=depth_anything,
        params=(_weights("depth-anything-small-hf", ANYTHING_GET),),
        needs_weights=True,
    ),
    Annotator(
        name="normal_midas",
        description="normal map from estimated depth, the v1.0 way (Sobel x/y, z = 2 pi, bg threshold)",
        fn=normal_midas,
        params=(_weights("dpt-hybrid-midas", MIDAS_GET), *normal_params()),
        needs_weights=True,
    ),
)
