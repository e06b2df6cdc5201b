"""The per-image measures: perfect agreement scores perfectly, known overlaps give the values
worked out by hand, disagreement scores worse, and maps of different shapes are refused."""

import cv2
import numpy as np
import pytest

from controlnet.data.colors import color_distance, rgb
from controlnet.data.fill50k import Sample, Shape, render_sample, sample_params, shape_masks
from controlnet.evaluation.metrics import (
    COLOUR_TOLERANCE,
    edge_f1,
    fill_outline,
    mean_iou,
    region_iou,
    rmse,
    shape_and_colour,
    ssim,
)

C1 = (0.01 * 255) ** 2  # SSIM's luminance constant


def circle(center=(20, 32), radius=10, color="red", background="white", size=64) -> Sample:
    return Sample(0, Shape.CIRCLE, center, radius, 0, color, background, size, 1)


def disc_pixels(radius_sq: float) -> int:
    """Pixel centres (integer offsets) within a disc: the lattice points with dx^2 + dy^2 <= radius_sq."""
    r = int(np.ceil(np.sqrt(radius_sq)))
    return sum(dx * dx + dy * dy <= radius_sq for dx in range(-r, r + 1) for dy in range(-r, r + 1))


def square_image(y: int, x: int, side: int = 16, size: int = 64) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[y : y + side, x : x + side] = 255
    return img


def canny_map(img: np.ndarray) -> np.ndarray:
    """A white-on-black edge condition, as the canny annotator makes it."""
    return np.where(cv2.Canny(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 100, 200) > 0, 255, 0).astype(np.uint8)


# ------------------------------------------------------------------------------- region_iou
def test_region_iou_of_known_overlaps():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[0:10, 0:10] = True  # 100 pixels
    b[5:15, 0:10] = True  # 100 pixels, 50 shared
    assert region_iou(a, b) == pytest.approx(50 / 150)
    assert region_iou(a, b) == region_iou(b, a)
    assert region_iou(a, a) == 1.0
    assert region_iou(a, ~a) == 0.0
    empty = np.zeros_like(a)
    assert region_iou(empty, empty) == 1.0  # nothing to find, nothing found
    assert region_iou(a, empty) == 0.0


def test_maps_of_different_shapes_are_refused_not_broadcast():
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    # numpy would broadcast (8, 8) against (8, 8, 1) and score a mask against itself as 1/3
    with pytest.raises(ValueError, match=r"region_iou: .*\(8, 8\) vs \(8, 8, 1\)"):
        region_iou(mask, mask[..., None])
    with pytest.raises(ValueError, match="rmse: the two maps differ in shape"):
        rmse(np.zeros((8, 8)), np.zeros((8, 1)))
    with pytest.raises(ValueError, match="ssim: the two maps differ in shape"):
        ssim(np.zeros((16, 16)), np.zeros((16, 8)))
    with pytest.raises(ValueError, match="mean_iou: the two maps differ in shape"):
        mean_iou(np.zeros((4, 4), int), np.zeros((4, 1), int), num_classes=2)
    with pytest.raises(ValueError, match="edge_f1: the two maps differ in shape"):
        edge_f1(square_image(8, 8), canny_map(square_image(8, 8, size=32)))
    source, target = render_sample(circle())
    with pytest.raises(ValueError, match=r"shape_and_colour: .*\(64, 64\) vs \(32, 32\)"):
        shape_and_colour(target, source[:32, :32], rgb("red"), rgb("white"))


# ------------------------------------------------------------------------------- fill_outline
@pytest.mark.parametrize("kind", ["circle", "shapes"])
def test_fill_outline_recovers_the_shape_and_its_outline(kind):
    for s in sample_params(12, size=64, seed=3, kind=kind):
        source, _ = render_sample(s)
        fill, outline = shape_masks(s)
        assert np.array_equal(fill_outline(source), fill | outline), s
        assert np.array_equal(fill_outline(source[..., 0]), fill | outline)  # a grey map works too


def test_fill_outline_of_a_known_circle():
    source, _ = render_sample(circle(radius=10))
    region = fill_outline(source)
    # outline width 1 at 64 px: the region is every pixel centre within 10.5 of the centre
    assert region.sum() == disc_pixels(10.5**2)
    assert region[32, 20] and region[32, 30] and not region[32, 31]
    assert not fill_outline(np.zeros((32, 32, 3), np.uint8)).any()


# ------------------------------------------------------------------------------- shape_and_colour
def test_the_ground_truth_target_scores_perfect_colours_and_the_outline_limited_iou():
    source, target = render_sample(circle(radius=10))
    s = shape_and_colour(target, source, rgb("red"), rgb("white"))
    assert s["shape_delta_e"] == pytest.approx(0, abs=1e-9)
    assert s["background_delta_e"] == pytest.approx(0, abs=1e-9)
    # the target fills the centres within 10 px; the filled outline reaches 10.5 px
    assert s["iou"] == pytest.approx(disc_pixels(100) / disc_pixels(110.25))
    assert s["iou"] > 0.9


def test_a_shifted_circle_scores_the_iou_of_two_overlapping_discs():
    r = 10
    source, _ = render_sample(circle(center=(20, 32), radius=r))
    _, shifted = render_sample(circle(center=(20 + r, 32), radius=r))  # moved by one radius
    s = shape_and_colour(shifted, source, rgb("red"), rgb("white"))
    # two discs of radius r, centres r apart: lens r^2 (2pi/3 - sqrt3/2), IoU = lens / (2 pi r^2 - lens)
    lens = r * r * (2 * np.pi / 3 - np.sqrt(3) / 2)
    assert s["iou"] == pytest.approx(lens / (2 * np.pi * r * r - lens), abs=0.04)
    # outside the true region the background is still right; inside it, most pixels now show the
    # background, so the shape's colour is measured as white
    assert s["background_delta_e"] == pytest.approx(0, abs=1e-9)
    assert s["shape_delta_e"] == pytest.approx(color_distance("white", "red"))


def test_wrong_and_swapped_colours_score_badly():
    source, _ = render_sample(circle())
    _, blue = render_sample(circle(color="blue"))
    s = shape_and_colour(blue, source, rgb("red"), rgb("white"))
    # the shape's median colour is exactly blue: its distance is the red-blue distance
    assert s["shape_delta_e"] == pytest.approx(color_distance("blue", "red"))
    assert s["shape_delta_e"] > COLOUR_TOLERANCE
    assert s["background_delta_e"] == pytest.approx(0, abs=1e-9)

    _, swapped = render_sample(circle(color="white", background="red"))
    s = shape_and_colour(swapped, source, rgb("red"), rgb("white"))
    assert s["iou"] < 0.05  # the "shape" found is everything but the shape
    assert s["shape_delta_e"] == pytest.approx(color_distance("white", "red"))
    assert s["background_delta_e"] == pytest.approx(color_distance("red", "white"))


# ------------------------------------------------------------------------------- edge_f1
def test_edge_f1_of_an_image_against_its_own_edges_is_perfect():
    img = square_image(16, 16, side=32)
    assert edge_f1(img, canny_map(img)) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    edges_rgb = np.repeat(canny_map(img)[..., None], 3, -1)  # grey or RGB, image or condition: same
    assert edge_f1(img[..., 0], edges_rgb) == edge_f1(img, canny_map(img))


def test_edge_f1_with_half_the_condition_missing():
    one = square_image(8, 8)
    two = one | square_image(40, 40)  # a second, identical square far from the first
    s = edge_f1(one, canny_map(two))
    # every edge found is a true one; it finds one square of two (equal edge counts)
    assert s["precision"] == 1.0
    assert s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    s = edge_f1(two, canny_map(one))  # the other way round: half the edges found are spurious
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == 1.0


def test_edge_f1_tolerance_and_misses():
    img = square_image(16, 16, side=32)
    shifted = np.roll(canny_map(img), (2, 2), axis=(0, 1))  # every edge 2 px off (diagonally)
    assert edge_f1(img, shifted, tolerance=2)["f1"] == 1.0
    assert edge_f1(img, shifted, tolerance=1)["f1"] < 0.5
    far = np.roll(canny_map(img), (6, 6), axis=(0, 1))
    assert edge_f1(img, far)["f1"] < 0.2
    blank = np.zeros_like(img)  # an output with no edges finds nothing
    assert edge_f1(blank, canny_map(img)) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# ------------------------------------------------------------------------------- ssim
def test_ssim_identical_maps_and_a_known_constant_pair():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    assert ssim(np.repeat(a[..., None], 3, -1), a) == pytest.approx(1.0, abs=1e-9)  # RGB read as grey
    # constant maps: no variance, so SSIM is the luminance term (2 mx my + C1) / (mx^2 + my^2 + C1)
    x, y = np.full((16, 16), 100.0), np.full((16, 16), 150.0)
    assert ssim(x, y) == pytest.approx((2 * 100 * 150 + C1) / (100**2 + 150**2 + C1), rel=1e-9)


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. (2004) as their reference code computes it, window by window: an 11x11
    Gaussian of sigma 1.5 summing to 1, placed only where it fits inside the maps, L = 255."""
    r = np.arange(11) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            scores.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(scores))


def test_ssim_is_the_reference_definition():
    rng = np.random.default_rng(4)
    a = cv2.GaussianBlur(rng.uniform(0, 255, (40, 33)), (0, 0), 2)
    for b in (a + rng.normal(0, 10, a.shape), 255 - a, np.roll(a, 3, 1), rng.uniform(0, 255, a.shape)):
        assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-9)


def test_ssim_refuses_maps_smaller_than_its_window():
    with pytest.raises(ValueError, match=r"ssim: maps of \(10, 40\) are smaller than its 11x11 window"):
        ssim(np.zeros((10, 40)), np.zeros((10, 40)))


def test_ssim_falls_with_disagreement():
    rng = np.random.default_rng(1)
    a = cv2.GaussianBlur(rng.uniform(0, 255, (48, 48)), (0, 0), 2)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    little = np.clip(a + rng.normal(0, 5, a.shape), 0, 255)
    lots = np.clip(a + rng.normal(0, 40, a.shape), 0, 255)
    assert ssim(a, little) == pytest.approx(ssim(little, a))
    assert 1.0 > ssim(a, little) > ssim(a, lots) > 0
    assert ssim(a, 255 - a) < 0  # inverted structure anticorrelates


# ------------------------------------------------------------------------------- rmse
def test_rmse_by_hand():
    a = np.array([[0, 0], [0, 4]])
    assert rmse(a, a) == 0.0
    assert rmse(a, np.zeros_like(a)) == pytest.approx(2.0)  # sqrt(16 / 4)
    assert rmse(np.zeros((4, 4)), np.full((4, 4), 3.0)) == pytest.approx(3.0)
    # 8-bit maps are compared as numbers, not with uint8 wrap-around (10 - 250 is -240, not 16)
    lo, hi = np.full((4, 4), 10, np.uint8), np.full((4, 4), 250, np.uint8)
    assert rmse(lo, hi) == pytest.approx(240.0) and rmse(hi, lo) == pytest.approx(240.0)


# ------------------------------------------------------------------------------- mean_iou
def test_mean_iou_by_hand():
    truth = np.array([[0, 0, 1, 1]] * 4)
    pred = np.array([[0, 0, 0, 1]] * 4)
    assert mean_iou(truth, truth, num_classes=2) == 1.0
    # class 0: 8 shared of 12; class 1: 4 shared of 8
    assert mean_iou(pred, truth, num_classes=2) == pytest.approx((8 / 12 + 4 / 8) / 2)
    assert mean_iou(pred, truth, num_classes=2, ignore=0) == pytest.approx(4 / 8)
    # classes absent from both maps do not count; a class only predicted counts as 0
    assert mean_iou(pred, truth, num_classes=10) == mean_iou(pred, truth, num_classes=2)
    spurious = pred.copy()
    spurious[0, 0] = 5
    assert mean_iou(spurious, truth, num_classes=6) == pytest.approx((7 / 12 + 4 / 8 + 0) / 3)
    assert mean_iou(1 - truth, truth, num_classes=2) == 0.0
