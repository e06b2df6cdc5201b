"""OpenPose keypoints: the data, the renderer of the released annotator, and OpenPose JSON in and
out (the learned body estimator is :mod:`.pose_net`, its annotator :mod:`.openpose`).

Keypoints are stored resolution-free, as the v1.1 annotator does: x and y are fractions of the
image width and height, with a confidence; confidence <= 0 means "not detected". Layouts:
COCO-18 body (nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right
hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear), 21-point hands
(wrist, then four points per finger from the thumb), 70-point face (68 landmarks + 2 pupils).

:func:`draw_pose` draws exactly as the released v1.1 renderer: on black, the 17 limbs as filled
ellipses of half-width 4 in 18 fixed colours running red -> orange -> ... -> magenta, the whole
limb layer dimmed to 60 %, then the joints as radius-4 discs in full colour; hand edges as 2 px
lines coloured by hue (edge i of 20 has hue i/20), hand points as radius-4 blue discs; face
points as radius-3 white discs. Like the released code it truncates coordinates to whole pixels
and skips hand and face points that land on row or column 0.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..choices import MAX_SIDE

__all__ = [
    "BODY_COLORS",
    "BODY_LIMBS",
    "HAND_EDGES",
    "Person",
    "draw_pose",
    "people_from_openpose_json",
    "people_to_openpose_json",
]

#: The 17 drawn limbs of the COCO-18 body, as pairs of keypoint indices, in drawing order.
BODY_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

#: Colour of limb i and of keypoint i (RGB): the hue wheel from red to magenta in 18 steps.
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

#: The 20 edges of a 21-point hand: wrist to each finger base, then along the finger.
HAND_EDGES: tuple[tuple[int, int], ...] = tuple(
    (0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)
)

#: Edge i is drawn in the colour of hue i / 20 (full saturation and value), as floats for cv2.
HAND_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    tuple(255.0 * c for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))  # type: ignore[misc]
    for i in range(len(HAND_EDGES))
)

LIMB_HALF_WIDTH = 4
JOINT_RADIUS = 4
LIMB_DIM = 0.6
HAND_LINE_WIDTH = 2
HAND_POINT_RADIUS = 4
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_RADIUS = 3

# OpenPose's BODY_25 order -> COCO-18 (drops mid-hip and the six foot points).
_BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


@dataclass
class Person:
    """One person's keypoints: (N, 3) float arrays of x/W, y/H, confidence (<= 0: missing), or None.

    body: 18 COCO points; left_hand, right_hand: 21 points; face: 70 points.
    """

    body: np.ndarray | None = None
    left_hand: np.ndarray | None = None
    right_hand: np.ndarray | None = None
    face: np.ndarray | None = None


def _present(points: np.ndarray) -> np.ndarray:
    return (points[:, 2] > 0) & np.isfinite(points[:, :2]).all(axis=1)


def _draw_body(canvas: np.ndarray, bodies: Sequence[np.ndarray]) -> np.ndarray:
    h, w = canvas.shape[:2]
    for i, (a, b) in enumerate(BODY_LIMBS):
        for pts in bodies:
            ok = _present(pts)
            if not (ok[a] and ok[b]):
                continue
            xs = pts[[a, b], 0] * float(w)
            ys = pts[[a, b], 1] * float(h)
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            centre = (int(np.mean(xs)), int(np.mean(ys)))
            poly = cv2.ellipse2Poly(centre, (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, BODY_COLORS[i])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for i in range(len(BODY_COLORS)):
        for pts in bodies:
            if _present(pts)[i]:
                centre = (int(pts[i, 0] * w), int(pts[i, 1] * h))
                cv2.circle(canvas, centre, JOINT_RADIUS, BODY_COLORS[i], thickness=-1)
    return canvas


def _pixel(pt: np.ndarray, ok: bool, w: int, h: int) -> tuple[int, int] | None:
    """Whole-pixel position, or None when missing or on row/column 0 (as the released code skips)."""
    if not ok:
        return None
    x, y = int(pt[0] * w), int(pt[1] * h)
    return (x, y) if x > 0 and y > 0 else None


def _draw_hands(canvas: np.ndarray, hands: Sequence[np.ndarray]) -> None:
    h, w = canvas.shape[:2]
    for pts in hands:
        ok = _present(pts)
        px = [_pixel(pts[i], bool(ok[i]), w, h) for i in range(len(pts))]
        for (a, b), color in zip(HAND_EDGES, HAND_COLORS):
            if px[a] is not None and px[b] is not None:
                cv2.line(canvas, px[a], px[b], color, thickness=HAND_LINE_WIDTH)
        for p in px:
            if p is not None:
                cv2.circle(canvas, p, HAND_POINT_RADIUS, HAND_POINT_COLOR, thickness=-1)


def _draw_faces(canvas: np.ndarray, faces: Sequence[np.ndarray]) -> None:
    h, w = canvas.shape[:2]
    for pts in faces:
        ok = _present(pts)
        for i in range(len(pts)):
            p = _pixel(pts[i], bool(ok[i]), w, h)
            if p is not None:
                cv2.circle(canvas, p, FACE_POINT_RADIUS, (255, 255, 255), thickness=-1)


def draw_pose(
    people: Sequence[Person],
    height: int,
    width: int,
    *,
    body: bool = True,
    hands: bool = True,
    face: bool = True,
) -> np.ndarray:
    """Render people's keypoints on black: HxWx3 uint8 RGB, the released v1.1 OpenPose map."""
    canvas = np.zeros((height, width, 3), np.uint8)
    if body:
        canvas = _draw_body(canvas, [p.body for p in people if p.body is not None])
    if hands:
        # left then right for each person, the order the released annotator collects them in
        _draw_hands(canvas, [hd for p in people for hd in (p.left_hand, p.right_hand) if hd is not None])
    if face:
        _draw_faces(canvas, [p.face for p in people if p.face is not None])
    return canvas


def _points(flat: Any, n: int | None, key: str) -> np.ndarray | None:
    """(N, 3) x, y, confidence as written, checked; None when absent."""
    if flat is None or len(flat) == 0:
        return None
    try:
        arr = np.asarray(flat, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"OpenPose JSON: {key} must hold numbers") from None
    if arr.ndim != 1 or arr.size % 3 or (n is not None and arr.size != 3 * n):
        raise ValueError(f"OpenPose JSON: {key} must hold x, y, confidence triples ({n or 'any'} points)")
    if not np.isfinite(arr).all():
        raise ValueError(f"OpenPose JSON: {key} holds a number that is not finite")
    return arr.reshape(-1, 3).copy()


def people_from_openpose_json(
    data: Mapping[str, Any] | str, width: int | None = None, height: int | None = None
) -> tuple[list[Person], int, int]:
    """Parse OpenPose JSON (a dict or its text) -> (people, width, height).

    Coordinates are pixels, or fractions of the canvas when every visible point lies within 0-1
    (as some pose editors write them). The canvas size comes from ``canvas_width``/``canvas_height``
    (as pose editors write them) or from ``width``/``height``; the arguments win when both are
    given. ``pose_keypoints_2d`` may be COCO-18 (54 numbers) or BODY_25 (75, mapped to COCO-18).
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not OpenPose JSON: {e}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("people"), list):
        raise ValueError("not OpenPose JSON: no 'people' list")
    width = width or data.get("canvas_width")
    height = height or data.get("canvas_height")
    if not width or not height:
        raise ValueError("OpenPose JSON has no canvas_width/canvas_height: give the width and height")
    try:
        width, height = int(width), int(height)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"OpenPose JSON: the canvas size must be whole numbers, got {width}x{height}"
        ) from None
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"OpenPose JSON: the canvas {width}x{height} is not 1-{MAX_SIDE} pixels a side")
    keys = {
        "body": ("pose_keypoints_2d", 18),
        "left_hand": ("hand_left_keypoints_2d", 21),
        "right_hand": ("hand_right_keypoints_2d", 21),
        "face": ("face_keypoints_2d", None),
    }
    raw = []
    for entry in data["people"]:
        if not isinstance(entry, Mapping):
            raise ValueError("OpenPose JSON: each of 'people' must be an object")
        body = entry.get("pose_keypoints_2d") or None
        if body is not None and len(body) == 75:
            body = np.asarray(body, np.float64).reshape(25, 3)[list(_BODY25_TO_COCO18)].ravel()
        found = {"body": _points(body, 18, "pose_keypoints_2d")}
        for part, (key, n) in list(keys.items())[1:]:
            found[part] = _points(entry.get(key), n, key)
        raw.append(found)
    visible = [pts[pts[:, 2] > 0, :2] for found in raw for pts in found.values() if pts is not None]
    xy = np.concatenate(visible) if visible else np.zeros((0, 2))
    fractions = xy.size > 0 and float(xy.min()) >= 0 and float(xy.max()) <= 1
    for found in raw:
        for pts in found.values():
            if pts is not None and not fractions:
                pts[:, 0] /= width
                pts[:, 1] /= height
    return [Person(**found) for found in raw], width, height


def people_to_openpose_json(people: Sequence[Person], width: int, height: int) -> dict[str, Any]:
    """People -> OpenPose JSON (pixel coordinates, missing points as 0, 0, 0) with the canvas size."""

    def flat(pts: np.ndarray | None) -> list[float]:
        if pts is None:
            return []
        out = pts.astype(np.float64) * np.array([width, height, 1.0])
        out[~_present(pts)] = 0.0
        return [round(float(v), 3) for v in out.ravel()]

    return {
        "canvas_width": width,
        "canvas_height": height,
        "people": [
            {
                "pose_keypoints_2d": flat(p.body),
                "hand_left_keypoints_2d": flat(p.left_hand),
                "hand_right_keypoints_2d": flat(p.right_hand),
                "face_keypoints_2d": flat(p.face),
            }
            for p in people
        ],
    }
