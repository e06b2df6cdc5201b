"""Classical annotators (no weights) on images the tests draw, and the shared utilities."""

import cv2
import numpy as np
import pytest
import torch

import controlnet.annotators as A
from controlnet.annotators.lines import detect_segments, merge_segments
from controlnet.annotators.softedge import safe_step


def shapes(h=128, w=160):
    """Light grey page with a red square, a blue disc and a dark line."""
    img = np.full((h, w, 3), 230, np.uint8)
    cv2.rectangle(img, (20, 20), (70, 70), (200, 30, 30), -1)
    cv2.circle(img, (115, 60), 28, (30, 60, 200), -1)
    cv2.line(img, (10, 110), (150, 95), (20, 20, 20), 2)
    return img


def square(h=128, w=160):
    img = np.zeros((h, w, 3), np.uint8)
    cv2.rectangle(img, (30, 20), (110, 100), (255, 255, 255), -1)
    return img


def test_canny_equals_cv2():
    img = shapes()
    for lo, hi in [(100, 200), (30, 90)]:
        out = A.annotate("canny", img, low_threshold=lo, high_threshold=hi)
        ref = cv2.Canny(img, lo, hi)
        assert out.shape == (*img.shape[:2], 3) and out.dtype == np.uint8
        assert np.array_equal(out[:, :, 0], ref) and np.array_equal(out[:, :, 2], ref)


def _on_side(seg, side):
    """Both ends of the segment within 2 px of the given square side, covering most of it."""
    (x1, y1, x2, y2), (sx1, sy1, sx2, sy2) = seg, side
    if sx1 == sx2:  # vertical side
        return abs(x1 - sx1) <= 2 and abs(x2 - sx1) <= 2 and abs(abs(y2 - y1) - abs(sy2 - sy1)) <= 4
    return abs(y1 - sy1) <= 2 and abs(y2 - sy1) <= 2 and abs(abs(x2 - x1) - abs(sx2 - sx1)) <= 4


def test_square_gives_four_segments_on_its_sides():
    sides = [(30, 20, 110, 20), (30, 100, 110, 100), (30, 20, 30, 100), (110, 20, 110, 100)]
    for img in (square(), 255 - square()):  # filled white square on black, and its negative
        segs = detect_segments(img)
        assert len(segs) == 4
        assert all(any(_on_side(s, side) for s in segs) for side in sides)
    outline = np.full((128, 160, 3), 255, np.uint8)
    cv2.rectangle(outline, (30, 20), (110, 100), (0, 0, 0), 2)  # a stroke: Canny sees both of its edges
    assert len(detect_segments(outline, merge=False)) > 4
    assert len(detect_segments(outline)) == 4
    m = A.annotate("lines", square())
    assert set(np.unique(m)) == {0, 255}  # 1 px white lines on black
    assert m[60, 28:33, 0].max() == 255 and m[60, 60, 0] == 0


def test_lines_merge_is_stable_on_a_busy_image():
    rng = np.random.default_rng(0)
    img = np.full((256, 320, 3), 128, np.uint8)
    for _ in range(60):
        x1, x2 = rng.integers(0, 320, 2)
        y1, y2 = rng.integers(0, 256, 2)
        cv2.line(img, (int(x1), int(y1)), (int(x2), int(y2)), (255, 255, 255), int(rng.integers(1, 4)))
    raw = detect_segments(img, merge=False)
    merged = merge_segments(raw)
    assert 0 < len(merged) < len(raw)
    assert len(merge_segments(merged)) == len(merged)  # nothing left to merge


def test_soft_edges_and_safe_quantisation():
    img = shapes()
    soft = A.annotate("softedge", img)[:, :, 0]
    assert soft[45, 20] > 200 and soft[45, 45] < 10  # on the square's left edge / inside it
    assert len(np.unique(soft)) > 20  # grey levels, not a binary map
    safe = A.annotate("softedge", img, safe=True)[:, :, 0]
    assert set(np.unique(safe)) <= {0, 127, 255}
    x = np.linspace(0, 1, 101, dtype=np.float32)
    assert set(np.unique(safe_step(x)).tolist()) == {0.0, 0.5, 1.0}


def test_scribble_and_fake_scribble():
    drawing = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(drawing, (5, 32), (58, 32), (0, 0, 0), 3)
    s = A.annotate("scribble", drawing)
    assert s[32, 30, 0] == 255 and s[10, 10, 0] == 0  # black-on-white -> white-on-black
    fake = A.annotate("fake_scribble", shapes())[:, :, 0]
    assert set(np.unique(fake)) == {0, 255}
    assert fake[45, 20] == 255 and fake[45, 45] == 0  # strokes on the square's edge, not inside


def test_lineart_dark_on_white_and_model_reads_one_minus_map():
    img = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(img, (5, 32), (58, 32), (0, 0, 0), 2)
    m = A.annotate("lineart", img)
    assert m[32, 30, 0] < 64 and m[5, 5, 0] == 255
    ann = A.ANNOTATORS["lineart"]
    assert ann.model_invert and not A.ANNOTATORS["canny"].model_invert
    t = A.condition_tensor(m, invert=ann.model_invert)
    assert torch.allclose(t, 1 - A.condition_tensor(m))
    assert t[0, 0, 32, 30] > 0.75 and t[0, 0, 5, 5] == 0


def test_shuffle_is_deterministic_by_seed():
    img = shapes()
    a = A.annotate("shuffle", img, seed=3)
    assert np.array_equal(a, A.annotate("shuffle", img, seed=3))
    assert not np.array_equal(a, A.annotate("shuffle", img, seed=4))
    assert a.shape == img.shape and not np.array_equal(a, img)


def test_tile_color_invert_binary():
    img = shapes()
    assert np.array_equal(A.annotate("tile", img), img)  # default: the image itself
    t = A.annotate("tile", img, downsample=8.0)
    assert t.shape == img.shape and np.abs(t.astype(int) - img).max() > 50
    grid = A.annotate("color", img, cell=32)
    assert grid.shape == img.shape and len(np.unique(grid[:32, :32].reshape(-1, 3), axis=0)) == 1
    assert np.array_equal(A.annotate("invert", img), 255 - img)
    half = np.zeros((10, 10, 3), np.uint8)
    half[:, 5:] = 200
    assert np.array_equal(A.annotate("binary", half)[:, :, 0] > 0, half[:, :, 0] > 0)  # Otsu
    assert A.annotate("binary", half, threshold=250).max() == 0
    assert np.array_equal(A.annotate("binary", half, invert=True)[:, :, 0] > 0, half[:, :, 0] == 0)


def test_inpaint_map_and_condition_tensor():
    img = shapes(64, 64)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:50] = True
    with pytest.raises(ValueError, match="mask"):
        A.annotate("inpaint", img)
    m = A.annotate("inpaint", img, mask=mask)
    assert m.shape == (64, 64, 4) and m.dtype == np.uint8
    assert np.array_equal(m[:, :, 3] == 0, mask) and np.array_equal(m[~mask, :3], img[~mask])
    t = A.condition_tensor(m)
    assert t.shape == (1, 3, 64, 64) and t.dtype == torch.float32
    assert torch.all(t[0][:, torch.from_numpy(mask)] == -1)
    assert torch.allclose(t[0][:, ~torch.from_numpy(mask)], torch.from_numpy(img[~mask].T / 255.0).float())
    # the mask may be uint8 (> 127 = repaint) and of another size (nearest resize)
    small = np.zeros((32, 32), np.uint8)
    small[5:10, 15:25] = 255
    assert np.array_equal(A.annotate("inpaint", img, mask=small)[:, :, 3] == 0, mask)
    # resizing for the model keeps the mask binary
    big = A.resize_for_model(m, 128)
    assert set(np.unique(big[:, :, 3])) == {0, 255} and (big[:, :, 3] == 0).sum() == 4 * mask.sum()


def test_repaint_map_is_the_image_black_where_masked():
    """ProMax's repaint kind reads the image with the pixels to paint at 0 (not -1): plain RGB."""
    img = shapes(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 30:50] = 255
    with pytest.raises(ValueError, match="repaint needs a mask"):
        A.annotate("repaint", img)
    m = A.annotate("repaint", img, mask=mask)
    hole = mask > 127
    assert m.shape == (64, 64, 3) and m[hole].max() == 0 and np.array_equal(m[~hole], img[~hole])
    assert torch.all(A.condition_tensor(m)[0][:, torch.from_numpy(hole)] == 0)


def test_hwc3():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(A.hwc3(g), np.stack([g] * 3, 2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[0, 0, 3] = 255  # opaque pixel keeps its colour; transparent ones become white
    out = A.hwc3(rgba)
    assert out[0, 0].tolist() == [100] * 3 and out[1, 1].tolist() == [255] * 3
    with pytest.raises(ValueError):
        A.hwc3(np.zeros((2, 2), np.float32))


def test_resize_for_model():
    img = np.random.default_rng(0).integers(0, 256, (300, 450, 3), dtype=np.uint8)
    out = A.resize_for_model(img, 512)
    assert out.shape == (512, 768, 3)  # short side 512, 675 -> nearest multiple of 64
    assert A.resize_for_model(img, 256).shape == (256, 384, 3)
    labels = np.zeros((100, 130, 3), np.uint8)
    labels[:, 65:] = (6, 230, 230)
    near = A.resize_for_model(labels, 512, nearest=True)
    assert near.shape == (512, 640, 3)
    assert {tuple(c) for c in near.reshape(-1, 3)} == {(0, 0, 0), (6, 230, 230)}  # no new colours
    assert len({tuple(c) for c in A.resize_for_model(labels, 512).reshape(-1, 3)}) > 2


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
    return img


def _extent(img: np.ndarray) -> tuple[int, int]:
    """(height, width) of the white blob."""
    ys, xs = np.nonzero(img[..., 0] > 127)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_fit_to_a_square_stretches_crops_or_pads():
    """A wide picture (a disc in the middle, a bar at the left edge) on a square canvas: stretch
    squashes the disc; crop keeps it round and cuts the bar off; fill keeps both, round, and pads
    with the border's colour."""
    wide = _disc(60, 120, 30, 60, 20)
    wide[:, :6] = 255  # the bar: only a fit that keeps the whole width keeps it
    stretched = A.fit_to(wide, (64, 64), "stretch")
    cropped = A.fit_to(wide, (64, 64), A.ResizeMode.CROP)
    filled = A.fit_to(wide, (64, 64), "fill")
    for out in (stretched, cropped, filled):
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    h, w = _extent(A.fit_to(_disc(60, 120, 30, 60, 20), (64, 64), "stretch"))
    assert h > 1.6 * w  # squashed sideways
    assert abs(np.subtract(*_extent(cropped))) <= 1  # round; scaled by 64/60
    assert 42 <= _extent(cropped)[0] <= 44 and not cropped[:, :4].any()  # the bar is cut off
    assert filled[16:48, :3].all()  # the bar is kept
    assert not filled[:16].any() and not filled[48:].any()  # padded with the border's black
    assert abs(np.subtract(*_extent(filled[:, 8:]))) <= 1  # round: 64/120 of 41 px
    # the padding is the border's colour: its median, or its commonest code for label maps
    grey = np.full((30, 60, 3), 90, np.uint8)
    grey[0, :] = 10  # a minority of the border
    assert (A.fit_to(grey, (64, 64), "fill")[:10] == 90).all()
    labels = np.zeros((30, 60, 3), np.uint8)
    labels[:, :40] = (6, 230, 230)
    padded = A.fit_to(labels, (64, 64), "fill", nearest=True)
    assert {tuple(c) for c in padded.reshape(-1, 3)} == {(0, 0, 0), (6, 230, 230)}  # no new colours
    assert tuple(padded[0, 0]) == (6, 230, 230)  # the commonest border colour
    # an alpha channel pads as 0 (no condition: an inpainting map's pixels to generate); masks take a value
    rgba = np.full((30, 60, 4), 255, np.uint8)
    assert (A.fit_to(rgba, (64, 64), "fill")[:10] == 0).all()
    mask = np.zeros((30, 60), np.float32)
    assert A.fit_to(mask, (64, 64), "fill", fill=1.0)[:10].min() == 1.0
    with pytest.raises(ValueError, match="'zoom' is not a valid ResizeMode"):
        A.fit_to(wide, (64, 64), "zoom")


def test_prepare_condition_sizes_and_nearest():
    img = shapes(100, 150)
    out = A.prepare_condition("canny", img, resolution=256, detect_resolution=128)
    assert out.shape == (256, 384, 3)
    labels = np.zeros((100, 150, 3), np.uint8)
    labels[:, 75:] = 12
    seg = A.prepare_condition("seg_labels", labels, resolution=256)
    assert {tuple(c) for c in seg.reshape(-1, 3)} == {(120, 120, 120), (150, 5, 61)}


def test_param_validation():
    img = shapes(32, 32)
    with pytest.raises(ValueError, match=r"unknown annotator 'nope'.*canny"):
        A.annotate("nope", img)
    with pytest.raises(ValueError, match=r"no param 'low'.*low_threshold, high_threshold"):
        A.annotate("canny", img, low=5)
    with pytest.raises(ValueError, match=r"low_threshold=300 is out of range \[1, 255\]"):
        A.annotate("canny", img, low_threshold=300)
    with pytest.raises(ValueError, match="low_threshold must be an integer"):
        A.annotate("canny", img, low_threshold=1.5)
    with pytest.raises(ValueError, match="safe must be true or false"):
        A.annotate("softedge", img, safe="yes")
    with pytest.raises(ValueError, match="palette must be one of ade20k, coco"):
        A.annotate("seg_labels", img, palette="voc")
    assert A.parse_params("softedge", ["sigma=2", "safe=yes"]) == {"sigma": 2.0, "safe": True}
    assert A.parse_params("shuffle", [" seed = 7 "]) == {"seed": 7}
    for bad, msg in [("sigma", "not key=value"), ("sigma=x", "must be a number"), ("seed=1.5", "integer")]:
        with pytest.raises(ValueError, match=msg):
            A.parse_params("softedge" if "sigma" in bad else "shuffle", [bad])
    ann = A.ANNOTATORS["canny"]
    assert ann.check_params({}) == {"low_threshold": 100, "high_threshold": 200}


def test_registry_is_complete_and_consistent():
    expected = {
        "canny", "lines", "softedge", "scribble", "fake_scribble", "lineart", "shuffle", "tile", "color",
        "inpaint", "invert", "binary", "openpose", "segmentation", "seg_labels", "depth_midas",
        "depth_anything", "normal_midas", "normal_from_depth", "hed", "scribble_hed",
    }  # fmt: skip
    assert expected <= set(A.ANNOTATORS)
    for name, ann in A.ANNOTATORS.items():
        assert ann.name == name
        for p in ann.params:
            assert p.check(p.default) == p.default  # every default is valid
        has_weights = any(p.name == "weights" for p in ann.params)
        assert has_weights == ann.needs_weights
    assert A.ANNOTATORS["openpose"].nearest and A.ANNOTATORS["segmentation"].nearest
    assert "ControlNetHED.pth" in A.ANNOTATORS["hed"].param("weights").help
    assert "body_pose_model.pth" in A.ANNOTATORS["openpose"].param("weights").help
    assert "dpt_hybrid-midas-501f0c75.pt" in A.ANNOTATORS["depth_midas"].param("weights").help
    listing = A.describe()
    assert "canny  (no weights)" in listing and "low_threshold=100" in listing
    assert "hed  (needs weights)" in listing


@pytest.mark.parametrize(
    ("name", "annotator"),
    [
        ("control_v11p_sd15_canny", "canny"),
        ("control_v11f1p_sd15_depth", "depth_midas"),
        ("control_sd15_openpose", "openpose"),
        ("control_v11p_sd15_softedge", "softedge"),
        ("control_v11p_sd15s2_lineart_anime", "lineart"),
        ("control_v11p_sd15_seg", "segmentation"),
        ("control_v11p_sd15_normalbae", "normal_midas"),
        ("control_v11p_sd15_mlsd", "lines"),
        ("control_v11p_sd15_scribble", "scribble"),
        ("control_v11e_sd15_shuffle", "shuffle"),
        ("control_v11f1e_sd15_tile", "tile"),
        ("control_v11p_sd15_inpaint", "inpaint"),
        ("fill50k-controlnet", None),  # the bundled model reads outlines as they are
    ],
)
def test_the_annotator_follows_the_controlnets_name(name, annotator):
    """The web app's units start with the annotator the served ControlNet's condition needs."""
    from controlnet.annotators import annotator_for

    assert annotator_for(name) == annotator
