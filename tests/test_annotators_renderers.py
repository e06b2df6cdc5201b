"""Renderers for structured data: OpenPose keypoints, palettes, depth and normal maps."""

import json

import numpy as np
import pytest

import controlnet.annotators as A
from controlnet.annotators.normal import rgb_to_normals
from controlnet.annotators.palettes import ADE20K_CLASSES, COCO_CLASSES, PALETTES
from controlnet.annotators.pose import BODY_COLORS, HAND_EDGES, Person, people_to_openpose_json

H, W = 100, 160


def body(points: dict[int, tuple[float, float]]) -> np.ndarray:
    """An (18, 3) body from {index: (x px, y px)}; the rest missing."""
    b = np.zeros((18, 3))
    for i, (x, y) in points.items():
        b[i] = (x / W, y / H, 1.0)
    return b


def test_pose_limb_and_joint_colours():
    # neck (1) and right shoulder (2): limb 0, drawn red at 60 %, joints in full colour
    m = A.draw_pose([Person(body=body({1: (40, 50), 2: (100, 50)}))], H, W)
    assert m.shape == (H, W, 3) and m.dtype == np.uint8
    dim_red = [int(255 * 0.6), 0, 0]
    for y in (47, 50, 53):  # within the half-width of 4 around the limb's axis
        assert m[y, 70].tolist() == dim_red
    assert m[44, 70].tolist() == [0, 0, 0] and m[56, 70].tolist() == [0, 0, 0]
    assert m[50, 40].tolist() == list(BODY_COLORS[1]) == [255, 85, 0]
    assert m[50, 100].tolist() == list(BODY_COLORS[2]) == [255, 170, 0]
    assert m[50, 103].tolist() == [255, 170, 0] and m[50, 106].tolist() == [0, 0, 0]  # joint radius 4
    # a limb needs both ends: a lone keypoint is only a joint
    lone = A.draw_pose([Person(body=body({0: (80, 20)}))], H, W)
    assert lone[20, 80].tolist() == list(BODY_COLORS[0]) and (lone.sum(2) > 0).sum() < 60
    # left knee -> left ankle is limb 11, colour (0, 85, 255) dimmed
    legs = A.draw_pose([Person(body=body({12: (30, 20), 13: (30, 80)}))], H, W)
    assert legs[50, 30].tolist() == [0, int(85 * 0.6), int(255 * 0.6)]


def test_hand_and_face_drawing():
    hand = np.zeros((21, 3))
    hand[0] = (40 / W, 50 / H, 1)  # wrist
    hand[5] = (100 / W, 50 / H, 1)  # index finger base: edge 4 (0 -> 5) has hue 4/20
    assert HAND_EDGES[4] == (0, 5)
    m = A.draw_pose([Person(right_hand=hand)], H, W)
    assert m[50, 70].tolist() == [204, 255, 0]
    assert m[50, 40].tolist() == [0, 0, 255] and m[50, 100].tolist() == [0, 0, 255]  # blue points
    face = np.zeros((70, 3))
    face[:, 2] = 1
    face[:, 0] = np.linspace(20, 140, 70) / W
    face[:, 1] = 30 / H
    face[0, 1] = 0.0  # on row 0: skipped, as the released renderer does
    f = A.draw_pose([Person(face=face)], H, W)
    assert f[30, 80].tolist() == [255, 255, 255] and f[0:3, 20].max() == 0
    assert A.draw_pose([Person(right_hand=hand, face=face)], H, W, hands=False, face=False).max() == 0


def test_openpose_json_in_and_out():
    b = body({0: (80, 20), 1: (80, 40), 2: (60, 40), 3: (55, 60)})
    doc = people_to_openpose_json([Person(body=b)], W, H)
    people, w, h = A.people_from_openpose_json(json.dumps(doc))
    assert (w, h) == (W, H) and len(people) == 1
    assert np.allclose(people[0].body, b, atol=1e-3)
    # BODY_25 (OpenPose's default model) is mapped to COCO-18
    b25 = np.zeros((25, 3))
    b25[[0, 1, 2, 9, 15]] = [[80, 20, 1], [80, 40, 1], [60, 40, 1], [70, 70, 0.9], [75, 15, 0.8]]
    p25, _, _ = A.people_from_openpose_json({"people": [{"pose_keypoints_2d": b25.ravel().tolist()}]}, W, H)
    got = p25[0].body
    assert got[8, 2] == pytest.approx(0.9) and got[8, 0] == pytest.approx(70 / W)  # right hip
    assert got[14, 2] == pytest.approx(0.8)  # right eye
    with pytest.raises(ValueError, match="canvas_width"):
        A.people_from_openpose_json({"people": []})
    with pytest.raises(ValueError, match="18 points"):
        A.people_from_openpose_json({"people": [{"pose_keypoints_2d": [1, 2, 3]}]}, W, H)
    with pytest.raises(ValueError, match="not OpenPose JSON"):
        A.people_from_openpose_json("{oops", W, H)


def test_palette_round_trip_is_exact():
    assert len(ADE20K_CLASSES) == len(PALETTES["ade20k"]) == 150
    assert len(COCO_CLASSES) == len(PALETTES["coco"]) == 133
    assert PALETTES["ade20k"][12].tolist() == [150, 5, 61]  # person
    rng = np.random.default_rng(0)
    for name, n in (("ade20k", 150), ("coco", 133)):
        labels = rng.integers(0, n, (40, 50)).astype(np.int32)
        labels.ravel()[:n] = np.arange(n)  # every class present
        if name == "ade20k":  # road (6) and skyscraper (48) share a colour: 48 reads back as 6
            back = A.colors_to_labels(A.labels_to_colors(labels, name), name)
            assert np.array_equal(back, np.where(labels == 48, 6, labels))
            labels[labels == 48] = 6
        colors = A.labels_to_colors(labels, name)
        assert colors.dtype == np.uint8 and colors.shape == (40, 50, 3)
        assert np.array_equal(A.colors_to_labels(colors, name), labels)
    with pytest.raises(ValueError, match="not in the ade20k palette"):
        A.colors_to_labels(np.full((2, 2, 3), 1, np.uint8))
    off = A.labels_to_colors(np.array([[12]]))
    off[0, 0, 0] -= 2  # slightly off colour: nearest palette entry when not strict
    assert A.colors_to_labels(off, strict=False)[0, 0] == 12
    with pytest.raises(ValueError, match=r"\[0, 149\]"):
        A.labels_to_colors(np.array([[150]]))


def test_depth_to_map_near_is_bright():
    inverse = np.tile(np.linspace(1.0, 5.0, 20), (4, 1))  # disparity: right side is near
    m = A.depth_to_map(inverse)
    assert m[0, 0] == 0 and m[0, -1] == 255 and np.all(np.diff(m[0].astype(int)) >= 0)
    metric = 1.0 / inverse  # distance: right side is near
    mm = A.depth_to_map(metric, kind="metric")
    assert mm[0, -1] == 255 and mm[0, 0] == 0 and np.all(np.diff(mm[0].astype(int)) >= 0)
    holes = inverse.copy()
    holes[0, 5] = np.nan
    assert A.depth_to_map(holes)[0, 5] == 0
    assert A.depth_to_map(np.full((3, 3), 2.0)).max() == 0


def test_normals_unit_length_and_flat_on_a_plane():
    flat = A.depth_to_normal(np.full((16, 16), 3.0))
    assert np.allclose(flat, [0, 0, 1])
    assert np.all(A.normals_to_rgb(flat) == [127, 127, 255])
    assert np.all(A.normals_to_rgb(flat, order="zyx") == [255, 127, 127])  # as the v1.0 model was fed
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    tilted = 10.0 + 0.5 * xx + 0.25 * yy  # every pixel foreground (normalised depth >= 0.4 needs offset)
    n = A.depth_to_normal(tilted, bg_threshold=0.0)
    assert np.allclose(np.linalg.norm(n, axis=2), 1.0, atol=1e-5)
    expect = np.array([8 * 0.5, 8 * 0.25, 2 * np.pi])  # Sobel (ksize 3) of a ramp is 8 x its slope
    assert np.allclose(n[1:-1, 1:-1], expect / np.linalg.norm(expect), atol=1e-5)
    back = rgb_to_normals(A.normals_to_rgb(n))
    assert np.allclose(np.linalg.norm(back, axis=2), 1.0, atol=0.02)
    # background threshold: far pixels (normalised depth < 0.4) are flat
    ramp = np.tile(np.linspace(0.0, 1.0, 40, dtype=np.float32) ** 2, (8, 1)) * 50
    nb = A.depth_to_normal(ramp, bg_threshold=0.4)
    far = (ramp - ramp.min()) / (ramp.max() - ramp.min()) < 0.4
    assert np.allclose(nb[far], [0, 0, 1]) and not np.allclose(nb[~far][:, 0], 0)


def test_normal_from_depth_map_entry():
    yy, xx = np.mgrid[0:64, 0:64]
    sphere = np.sqrt(np.clip(30.0**2 - (xx - 32) ** 2 - (yy - 32) ** 2, 0, None))
    depth_map = np.repeat((sphere / sphere.max() * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    out = A.annotate("normal_from_depth", depth_map, order="xyz")
    assert out.shape == (64, 64, 3)
    assert out[2, 2].tolist() == [127, 127, 255]  # background: flat
    n = rgb_to_normals(out)
    assert n[32, 50, 0] < -0.3 and n[32, 14, 0] > 0.3  # x = Sobel x of the depth (falls to the right)
    assert np.allclose(np.linalg.norm(n, axis=2), 1.0, atol=0.02)
