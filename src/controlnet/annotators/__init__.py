"""Condition maps (annotators) and renderers, behind one registry.

``ANNOTATORS`` maps a name to an :class:`Annotator`: ``ANNOTATORS["canny"](image, low_threshold=50)``
returns the condition map. The CLI (``controlnet preprocess``), the generator and the web app all
use this registry, so a name and its parameters mean the same thing everywhere.

Conventions (see docs/annotators.md): images and maps are HxWx3 uint8 RGB; edges/lines/scribbles
are white on black; line art is dark on white and the model reads ``1 - map``; inpainting maps
are RGBA with alpha 0 on the masked pixels (-1 for the model); label and pose maps resize with
nearest-neighbour. Learned annotators read weights the user downloaded; nothing downloads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..choices import MAX_SIDE, ResizeMode
from . import (
    canny,
    color,
    depth,
    hed,
    inpaint,
    lineart,
    lines,
    normal,
    openpose,
    scribble,
    segmentation,
    shuffle,
    simple,
    softedge,
    tile,
)
from .depth import depth_to_map
from .normal import depth_to_normal, normals_to_rgb
from .pose import Person, draw_pose, people_from_openpose_json
from .registry import Annotator, Param, ParamType
from .segmentation import colors_to_labels, labels_to_colors
from .utils import (
    condition_tensor,
    fit_to,
    hwc3,
    model_size,
    resize_for_detection,
    resize_for_model,
    resize_to,
)

__all__ = [
    "ANNOTATORS",
    "Annotator",
    "Param",
    "ParamType",
    "Person",
    "ResizeMode",
    "annotate",
    "annotator_for",
    "colors_to_labels",
    "condition_size",
    "condition_tensor",
    "depth_to_map",
    "depth_to_normal",
    "describe",
    "draw_pose",
    "fit_to",
    "get",
    "hwc3",
    "labels_to_colors",
    "normals_to_rgb",
    "parse_params",
    "people_from_openpose_json",
    "prepare_condition",
    "resize_for_detection",
    "resize_for_model",
]

_MODULES = (canny, lines, softedge, hed, scribble, lineart, shuffle, tile, color, inpaint, simple)
_MODULES += (openpose, segmentation, depth, normal)

ANNOTATORS: dict[str, Annotator] = {a.name: a for m in _MODULES for a in m.ENTRIES}


def get(name: str) -> Annotator:
    """The annotator called ``name``; ValueError listing the known names otherwise."""
    try:
        return ANNOTATORS[name]
    except KeyError:
        raise ValueError(f"unknown annotator {name!r}; known: {', '.join(sorted(ANNOTATORS))}") from None


def annotate(name: str, image: np.ndarray, **params: Any) -> np.ndarray:
    """Run the annotator ``name`` on an HxWx3 uint8 RGB image (see :class:`Annotator`)."""
    return get(name)(image, **params)


def parse_params(name: str, pairs: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> typed parameters of annotator ``name`` (CLI, HTTP forms)."""
    return get(name).parse_params(pairs)


def prepare_condition(
    name: str,
    image: np.ndarray,
    *,
    resolution: int | None = None,
    detect_resolution: int | None = None,
    **params: Any,
) -> np.ndarray:
    """The whole path from a photo to a model-sized condition map, as the released apps did it.

    The image is resized to ``detect_resolution`` (if given) for the annotator, and the map to
    ``resolution`` (if given) for the model: short side, multiples of 64, nearest-neighbour for
    label and pose maps; the map's size comes from the photo's, so that resizing for the annotator
    does not change its aspect. Extra array inputs (the inpainting mask) must be the photo's size,
    and follow it to the annotator's. Sizes are checked before any work (:func:`condition_size`).
    """
    annotator = get(name)
    image = hwc3(image)
    if "mask" in params and params["mask"] is not None:
        mask = np.asarray(params["mask"])
        if mask.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                f"{image.shape[1]}x{image.shape[0]}; they must match"
            )
    target = condition_size(image.shape[:2], resolution, "resolution")
    if detect_resolution is not None:
        condition_size(image.shape[:2], detect_resolution, "detect_resolution")
        image = resize_for_detection(image, detect_resolution)
    cond = annotator(image, **params)
    if target is not None:
        cond = resize_to(cond, target, nearest=annotator.nearest)
    return cond


def condition_size(image_hw: tuple[int, int], resolution: int | None, name: str) -> tuple[int, int] | None:
    """(H, W) of an image of ``image_hw`` resized to ``resolution`` (short side, multiples of 64;
    None: unchanged); ValueError naming ``name`` for a size under 64 or a side over
    :data:`~controlnet.choices.MAX_SIDE`."""
    if resolution is None:
        return None
    if not 64 <= resolution <= MAX_SIDE:
        raise ValueError(f"{name} must be between 64 and {MAX_SIDE} pixels, got {resolution}")
    h, w = model_size(*image_hw, resolution)
    if max(h, w) > MAX_SIDE:
        raise ValueError(
            f"{name} {resolution} makes this {image_hw[1]}x{image_hw[0]} image {w}x{h}, over the "
            f"longest side of {MAX_SIDE} pixels"
        )
    return h, w


#: words in released ControlNet file names (``control_v11p_sd15_canny``, ``...openpose...``) and the
#: annotator that makes their condition from a photo, in the order they are looked for
_NAMED = (
    ("openpose", "openpose"),
    ("canny", "canny"),
    ("lineart", "lineart"),
    ("softedge", "softedge"),
    ("hed", "hed"),
    ("scribble", "scribble"),
    ("mlsd", "lines"),
    ("normal", "normal_midas"),
    ("depth", "depth_midas"),
    ("seg", "segmentation"),
    ("shuffle", "shuffle"),
    ("tile", "tile"),
    ("inpaint", "inpaint"),
)


def annotator_for(model_name: str) -> str | None:
    """The annotator a ControlNet's condition comes from, read from its name as released
    ControlNets are named; None when the name says nothing (then an image is taken as a ready
    map, which is what the bundled model, named for its data, reads)."""
    words = model_name.lower()
    return next((annotator for word, annotator in _NAMED if word in words), None)


def describe() -> str:
    """A plain-text table of every annotator: name, weights, parameters with defaults and ranges."""
    rows = []
    for a in sorted(ANNOTATORS.values(), key=lambda a: a.name):
        flags = ["needs weights" if a.needs_weights else "no weights"]
        if a.inputs:
            flags.append("inputs: " + ", ".join(a.inputs))
        if a.model_invert:
            flags.append("model reads 1 - map")
        rows.append(f"{a.name}  ({'; '.join(flags)})\n    {a.description}")
        for p in a.params:
            rng = p.range_text()
            default = f"{p.default:g}" if isinstance(p.default, float) else p.default
            rows.append(f"    {p.name}={default}  {p.type.value}{' ' + rng if rng else ''}: {p.help}")
    return "\n".join(rows)
