"""Semantic segmentation maps: label maps to palette colours and back, and the learned segmenter.

The seg models read a colour map: class i painted in palette colour i (ADE20K 150 classes by
default, or COCO panoptic 133; see :mod:`controlnet.annotators.palettes`). These maps must be
resized with nearest-neighbour only, so every pixel keeps an exact palette colour.

The learned segmenter is any transformers semantic-segmentation model in a local folder
(``AutoModelForSemanticSegmentation``: UperNet, SegFormer, BEiT, ...) whose class i is the
palette's class i, e.g. openmmlab/upernet-convnext-small for ADE20K.
"""

from __future__ import annotations

import numpy as np

from .hf import load_estimator, run_estimator
from .palettes import PALETTES
from .registry import Annotator, Param, ParamType

__all__ = ["colors_to_labels", "labels_to_colors", "segment"]

SEG_GET = (
    "a transformers semantic-segmentation folder whose classes follow the palette, "
    "such as openmmlab/upernet-convnext-small (ADE20K)"
)


def _palette(name: str) -> np.ndarray:
    try:
        return PALETTES[name]
    except KeyError:
        raise ValueError(f"unknown palette {name!r}; known: {', '.join(PALETTES)}") from None


def labels_to_colors(labels: np.ndarray, palette: str = "ade20k") -> np.ndarray:
    """HxW integer class indices -> HxWx3 uint8 RGB colour map."""
    pal = _palette(palette)
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be an HxW integer array, got {lab.dtype} {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= len(pal)):
        raise ValueError(f"labels must be in [0, {len(pal) - 1}] for the {palette} palette")
    return pal[lab]


def _keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colors_to_labels(colors: np.ndarray, palette: str = "ade20k", *, strict: bool = True) -> np.ndarray:
    """HxWx3 uint8 colour map -> HxW int32 class indices.

    A colour shared by several classes gives the lowest index. With ``strict`` a colour outside
    the palette raises ValueError; otherwise it takes the nearest palette colour (useful after a
    smoothing resize).
    """
    pal = _palette(palette)
    if colors.ndim != 3 or colors.shape[2] != 3:
        raise ValueError(f"colors must be HxWx3, got shape {colors.shape}")
    first: dict[int, int] = {}
    for i, k in enumerate(_keys(pal).tolist()):
        first.setdefault(k, i)  # a shared colour reads back as its lowest class
    uniq, inverse = np.unique(_keys(colors), return_inverse=True)
    lut = np.array([first.get(k, -1) for k in uniq.tolist()], np.int32)
    unknown = np.flatnonzero(lut < 0)
    if len(unknown) and strict:
        k = int(uniq[unknown[0]])
        bad = ((k >> 16) & 255, (k >> 8) & 255, k & 255)
        raise ValueError(f"colour {bad} is not in the {palette} palette ({len(unknown)} colours are not)")
    ref = pal.astype(np.int32)
    for chunk in np.array_split(unknown, max(1, len(unknown) // 4096)):
        rgb = np.stack([(uniq[chunk] >> 16) & 255, (uniq[chunk] >> 8) & 255, uniq[chunk] & 255], 1)
        lut[chunk] = ((rgb[:, None, :] - ref[None]) ** 2).sum(2).argmin(1)
    return lut[inverse.reshape(colors.shape[:2])]


def label_image_to_colors(image: np.ndarray, palette: str = "ade20k") -> np.ndarray:
    """A label image (grey value = class index, as in ADE20K annotation PNGs) -> colour map."""
    return labels_to_colors(image[:, :, 0].astype(np.int32), palette)


def segment(
    image: np.ndarray, weights: str = "upernet-convnext-small", palette: str = "ade20k"
) -> np.ndarray:
    """HxWx3 uint8 photo -> HxWx3 uint8 colour map by a local transformers segmentation model."""
    model, prep = load_estimator(weights, "segmentation", what="segmentation", get=SEG_GET)
    logits = run_estimator(image, model, prep)
    n = len(_palette(palette))
    if logits.shape[0] > n:
        raise ValueError(f"the model predicts {logits.shape[0]} classes but the {palette} palette has {n}")
    return labels_to_colors(logits.argmax(0).numpy().astype(np.int32), palette)


_PALETTE = Param(
    "palette", ParamType.CHOICE, "ade20k", "colour palette (class i -> colour i)", choices=tuple(PALETTES)
)

ENTRIES = (
    Annotator(
        name="segmentation",
        description="semantic segmentation by a transformers model (local folder), palette colours",
        fn=segment,
        params=(
            Param("weights", ParamType.STR, "upernet-convnext-small", f"{SEG_GET}: folder name or path"),
            _PALETTE,
        ),
        needs_weights=True,
        nearest=True,
    ),
    Annotator(
        name="seg_labels",
        description="colour a label image (grey value = class index) with the palette",
        fn=label_image_to_colors,
        params=(_PALETTE,),
        nearest=True,
    ),
)
