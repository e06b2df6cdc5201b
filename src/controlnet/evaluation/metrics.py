"""How well an output follows its condition: the per-image measures (pure numpy/OpenCV).

- Shape following (fill50k world): the condition's outline filled in is the ground-truth region;
  the output's region is the pixels nearer (in CIE Lab) to the prompt's shape colour than to its
  background colour; IoU of the two.
- Colour following: the median Lab colour of the ground-truth shape and of the background against
  the prompt's colours, as a CIEDE2000 distance (Delta E); "correct" when within a threshold.
- Outlines world (several shapes, each its own colour): the same per shape, against each shape's
  visible region re-derived from the sample's parameters.
- Edge following (general, as later work measures ControlNets): F1 of Canny edges re-extracted
  from the output against the condition's edges, with a small pixel tolerance.
- SSIM between maps (soft edges, line art), RMSE between depth maps, mean IoU between label maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..data.colors import delta_e, srgb_to_lab

__all__ = [
    "COLOUR_TOLERANCE",
    "edge_f1",
    "fill_outline",
    "image_outline_scores",
    "mean_iou",
    "outline_scores",
    "outline_shapes",
    "region_iou",
    "rmse",
    "shape_and_colour",
    "ssim",
]

#: CIEDE2000 distance within which a region's colour counts as the prompt's colour: about five
#: just-noticeable differences, and below the 15 that separates every fill50k colour pair.
COLOUR_TOLERANCE = 10.0
#: SSIM's Gaussian window: side and sigma (Wang et al. 2004)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def _same_shape(what: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
    """ValueError unless two maps have one shape: numpy would broadcast (H, W) against (H, W, 1)
    or (H, 1) silently and score pixels against the wrong pixels."""
    if tuple(a) != tuple(b):
        raise ValueError(f"{what}: the two maps differ in shape, {tuple(a)} vs {tuple(b)}")


def fill_outline(condition: np.ndarray, threshold: int = 127) -> np.ndarray:
    """A white outline on black (H, W[, 3]) -> boolean mask of the enclosed region, outline included."""
    grey = condition if condition.ndim == 2 else condition[..., :3].max(axis=-1)
    edges = (grey > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    region = np.zeros_like(edges)
    cv2.drawContours(region, contours, -1, 1, thickness=cv2.FILLED)
    return region.astype(bool)


def region_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    _same_shape("region_iou", np.shape(a), np.shape(b))
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def shape_and_colour(
    image: np.ndarray, condition: np.ndarray, shape_rgb: Sequence[int], background_rgb: Sequence[int]
) -> dict[str, float]:
    """Fill50k-world scores of one output (H, W, 3) uint8 against its outline condition and the
    prompt's two colours: ``iou`` of the shape, and the CIEDE2000 distance of the median colour
    of the true shape region (``shape_delta_e``) and of the rest (``background_delta_e``)."""
    _same_shape("shape_and_colour", image.shape[:2], condition.shape[:2])
    truth = fill_outline(condition)
    lab = srgb_to_lab(image)
    shape_lab, back_lab = srgb_to_lab(shape_rgb), srgb_to_lab(background_rgb)
    # a pixel belongs to the output's shape when it is nearer the shape colour than the background's
    predicted = np.linalg.norm(lab - shape_lab, axis=-1) < np.linalg.norm(lab - back_lab, axis=-1)
    inside = lab[truth] if truth.any() else lab.reshape(-1, 3)
    outside = lab[~truth] if (~truth).any() else lab.reshape(-1, 3)
    return {
        "iou": region_iou(predicted, truth),
        "shape_delta_e": float(delta_e(np.median(inside, 0), shape_lab)),
        "background_delta_e": float(delta_e(np.median(outside, 0), back_lab)),
    }


def outline_shapes(
    image: np.ndarray,
    visible: Sequence[np.ndarray],
    colours: Sequence[Sequence[int]],
    background_rgb: Sequence[int],
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Each shape of one output (H, W, 3) uint8 scored against its true visible region (boolean
    (H, W) masks, paint order) and its prompted colour (one per shape, then the background's).

    Each pixel takes the nearest (CIE Lab) of the prompt's colours. Per shape: ``area`` (its
    visible pixels), ``iou`` (the pixels that took its colour against its region) and
    ``colour_ok`` (its region's median colour within :data:`COLOUR_TOLERANCE` of its own, the region
    shrunk by a pixel, off the outline's edge). For the image: ``iou`` (the pixels that took any
    shape's colour against all shapes' regions) and ``background_colour_ok`` (the rest's median)."""
    if len(visible) != len(colours) or not visible:
        raise ValueError(f"outline_scores: {len(visible)} regions for {len(colours)} colours")
    for v in visible:
        _same_shape("outline_scores", image.shape[:2], v.shape)
    lab = srgb_to_lab(image)
    palette = srgb_to_lab(np.array([*colours, background_rgb], dtype=np.uint8))
    nearest = np.linalg.norm(lab[:, :, None] - palette, axis=-1).argmin(-1)
    background = len(colours)
    shapes = np.logical_or.reduce(visible)
    kernel = np.ones((3, 3), np.uint8)

    def median_ok(region: np.ndarray, target: np.ndarray) -> float:
        inner = cv2.erode(region.astype(np.uint8), kernel) > 0
        pixels = lab[inner] if inner.any() else lab[region]
        if not len(pixels):
            return 0.0
        return float(delta_e(np.median(pixels, 0), target) <= COLOUR_TOLERANCE)

    rows = [
        {"area": int(v.sum()), "iou": region_iou(nearest == j, v), "colour_ok": median_ok(v, palette[j])}
        for j, v in enumerate(visible)
    ]
    image_scores = {
        "iou": region_iou(nearest != background, shapes),
        "background_colour_ok": median_ok(~shapes, palette[background]) if (~shapes).any() else 1.0,
    }
    return rows, image_scores


def outline_scores(
    image: np.ndarray,
    visible: Sequence[np.ndarray],
    colours: Sequence[Sequence[int]],
    background_rgb: Sequence[int],
) -> dict[str, float]:
    """Outlines-world scores of one output (:func:`outline_shapes`' arguments): ``iou``;
    ``shape_iou``, the shapes' IoUs averaged; ``shape_colour_ok``, the share of shapes in their own
    colour; ``background_colour_ok``; ``colour_accuracy``, the mean of the last two."""
    return image_outline_scores(*outline_shapes(image, visible, colours, background_rgb))


def image_outline_scores(shapes: Sequence[dict[str, float]], image: dict[str, float]) -> dict[str, float]:
    """:func:`outline_scores` from what :func:`outline_shapes` returns."""
    out = {
        "iou": image["iou"],
        "shape_iou": float(np.mean([r["iou"] for r in shapes])),
        "shape_colour_ok": float(np.mean([r["colour_ok"] for r in shapes])),
        "background_colour_ok": image["background_colour_ok"],
    }
    out["colour_accuracy"] = (out["shape_colour_ok"] + out["background_colour_ok"]) / 2
    return out


def edge_f1(
    image: np.ndarray, condition_edges: np.ndarray, *, tolerance: int = 2, low: int = 100, high: int = 200
) -> dict[str, float]:
    """Canny edges of ``image`` against a binary edge map (white on black): precision, recall and
    F1, where an edge pixel matches when the other map has one within ``tolerance`` pixels."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    found = cv2.Canny(grey, low, high) > 0
    truth = (condition_edges if condition_edges.ndim == 2 else condition_edges.max(-1)) > 127
    _same_shape("edge_f1", np.shape(found), np.shape(truth))
    kernel = np.ones((2 * tolerance + 1,) * 2, np.uint8)
    near_truth = cv2.dilate(truth.astype(np.uint8), kernel) > 0
    near_found = cv2.dilate(found.astype(np.uint8), kernel) > 0
    precision = float((found & near_truth).sum() / found.sum()) if found.any() else 0.0
    recall = float((truth & near_found).sum() / truth.sum()) if truth.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two grey maps (H, W) in [0, 255] (RGB maps are read as the
    mean of their channels), as Wang et al. (2004) define and compute it: an 11x11 Gaussian window
    of sigma 1.5, placed only where it fits inside the maps, K1 = 0.01, K2 = 0.03, L = 255."""
    x, y = (np.asarray(v, np.float64) if v.ndim == 2 else np.asarray(v, np.float64).mean(-1) for v in (a, b))
    _same_shape("ssim", np.shape(x), np.shape(y))
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"ssim: maps of {x.shape} are smaller than its {SSIM_WINDOW}x{SSIM_WINDOW} window")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    r = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    g /= g.sum()
    cut = SSIM_WINDOW // 2

    def mean(z: np.ndarray) -> np.ndarray:  # the weighted mean under each window that fits
        return cv2.sepFilter2D(z, cv2.CV_64F, g, g)[cut:-cut, cut:-cut]

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square difference of two maps, in their units (8-bit depth maps: 0..255)."""
    _same_shape("rmse", np.shape(a), np.shape(b))
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int | None = None) -> float:
    """Mean IoU over the classes present in either label map (H, W) of ints."""
    _same_shape("mean_iou", np.shape(pred), np.shape(truth))
    ious = []
    for c in range(num_classes):
        if c == ignore:
            continue
        p, t = pred == c, truth == c
        if p.any() or t.any():
            ious.append(region_iou(p, t))
    return float(np.mean(ious)) if ious else 1.0
