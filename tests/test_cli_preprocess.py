"""`controlnet preprocess` and `controlnet render`: outputs, and one-line errors that write nothing."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnet.annotators.palettes import PALETTES
from controlnet.cli import main


@pytest.fixture
def photo(tmp_path):
    img = np.full((90, 120, 3), 230, np.uint8)
    cv2.rectangle(img, (20, 20), (70, 70), (200, 30, 30), -1)
    path = tmp_path / "photo.png"
    Image.fromarray(img).save(path)
    return path, img


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list(capsys):
    rc, out, _ = run(capsys, "preprocess", "--list")
    assert rc == 0
    assert "canny  (no weights)" in out and "low_threshold=100" in out
    assert "openpose  (needs weights)" in out and "body_pose_model.pth" in out
    assert "inpaint  (no weights; inputs: mask)" in out


def test_canny_resolution_and_params(capsys, photo, tmp_path):
    path, img = photo
    out_path = tmp_path / "edges.png"
    rc, out, _ = run(capsys, "preprocess", "canny", path, "-o", out_path, "--param", "low_threshold=50")
    assert rc == 0 and "edges.png" in out
    edges = np.asarray(Image.open(out_path))
    assert np.array_equal(edges[:, :, 0], cv2.Canny(img, 50, 200))
    rc, _, _ = run(capsys, "preprocess", "canny", path, "-o", out_path, "--resolution", "256")
    assert rc == 0 and np.asarray(Image.open(out_path)).shape == (256, 320, 3)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["preprocess", "nope", "{photo}", "-o", "{out}"], "unknown annotator 'nope'"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--param", "low_threshold=999"], "out of range"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--param", "lowthreshold=9"], "known params"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--param", "oops"], "not key=value"),
        (["preprocess", "canny", "{text}", "-o", "{out}"], "cannot read"),
        (["preprocess", "canny", "{missing}", "-o", "{out}"], "no such image"),
        (["preprocess", "canny", "{photo}"], "usage"),
        (["preprocess", "canny", "{photo}", "-o", "{tmp}/x.unknownext"], "unknown image extension"),
        (["preprocess", "hed", "{photo}", "-o", "{out}"], "ControlNetHED.pth"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--mask", "{photo}"], "takes no mask"),
        (["preprocess", "inpaint", "{photo}", "-o", "{out}"], "needs a mask"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--resolution", "10"], "between 64 and 4096"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--resolution", "100000"], "between 64 and 4096"),
        (["preprocess", "canny", "{photo}", "-o", "{out}", "--resolution", "4000"], "over the longest side"),
        (
            ["preprocess", "canny", "{photo}", "-o", "{out}", "--detect-resolution", "9999"],
            "detect_resolution",
        ),
        (["preprocess", "inpaint", "{photo}", "-o", "{out}", "--mask", "{small}"], "they must match"),
        (["render", "pose", "{text}", "-o", "{out}"], "not OpenPose JSON"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, photo, tmp_path, monkeypatch, argv, message):
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_DIR", str(tmp_path / "empty"))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = tmp_path / "out.png"
    Image.fromarray(np.zeros((45, 60), np.uint8)).save(tmp_path / "small.png")
    names = {"photo": photo[0], "out": out, "text": text, "missing": tmp_path / "nope.png", "tmp": tmp_path}
    names["small"] = tmp_path / "small.png"
    rc, _, err = run(capsys, *[a.format(**names) for a in argv])
    assert rc == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_inpaint_mask_and_failed_write_keeps_old_output(capsys, photo, tmp_path):
    path, _ = photo
    mask = np.zeros((90, 120), np.uint8)
    mask[30:60, 40:80] = 255
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)
    out_path = tmp_path / "inpaint.png"
    rc, _, _ = run(capsys, "preprocess", "inpaint", path, "-o", out_path, "--mask", mask_path)
    assert rc == 0
    rgba = np.asarray(Image.open(out_path))
    assert rgba.shape == (90, 120, 4) and np.array_equal(rgba[:, :, 3] == 0, mask > 0)
    jpg = tmp_path / "inpaint.jpg"
    jpg.write_bytes(b"old")
    rc, _, err = run(capsys, "preprocess", "inpaint", path, "-o", jpg, "--mask", mask_path)
    assert rc == 2 and "cannot write" in err  # JPEG has no alpha
    assert jpg.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))


def test_render_pose_json_and_labels(capsys, tmp_path):
    pose = {"canvas_width": 64, "canvas_height": 48, "people": [{"pose_keypoints_2d": [0.0] * 54}]}
    pose["people"][0]["pose_keypoints_2d"][3:9] = [20, 20, 1, 40, 20, 1]  # neck, right shoulder
    src = tmp_path / "pose.json"
    src.write_text(json.dumps(pose))
    out = tmp_path / "pose.png"
    rc, _, _ = run(capsys, "render", "pose", src, "-o", out)
    drawn = np.asarray(Image.open(out))
    assert rc == 0 and drawn.shape == (48, 64, 3) and drawn[20, 30].tolist() == [153, 0, 0]
    labels = np.array([[0, 12], [2, 149]], np.int32)
    np.save(tmp_path / "labels.npy", labels)
    rc, _, _ = run(capsys, "render", "labels", tmp_path / "labels.npy", "-o", tmp_path / "seg.png")
    assert rc == 0 and np.array_equal(
        np.asarray(Image.open(tmp_path / "seg.png")), PALETTES["ade20k"][labels]
    )
    np.save(tmp_path / "depth.npy", np.linspace(0, 1, 12).reshape(3, 4))
    rc, _, _ = run(capsys, "render", "depth", tmp_path / "depth.npy", "-o", tmp_path / "depth.png")
    assert rc == 0 and np.asarray(Image.open(tmp_path / "depth.png"))[2, 3].tolist() == [255] * 3


def test_a_folder_gives_a_map_per_image_paired_with_a_mask_folder(capsys, tmp_path):
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    frames.mkdir(), masks.mkdir()
    for k in range(3):
        img = np.full((48, 64, 3), 230, np.uint8)
        cv2.rectangle(img, (5 + 10 * k, 10), (25 + 10 * k, 30), (200, 30, 30), -1)
        Image.fromarray(img).save(frames / f"f{k + 8}.png")  # f8, f9, f10: natural order
        mask = np.zeros((48, 64), np.uint8)
        mask[:, 16 * k : 16 * k + 16] = 255
        Image.fromarray(mask).save(masks / f"m{k}.png")
    rc, out, err = run(capsys, "preprocess", "canny", frames, "-o", tmp_path / "edges")
    assert rc == 0 and "3/3" in err and out.count("canny map") == 3  # a bar, and a line per map
    for k in range(3):
        single = tmp_path / f"one{k}.png"
        assert run(capsys, "preprocess", "canny", frames / f"f{k + 8}.png", "-o", single)[0] == 0
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "edges" / f"f{k + 8}.png")), np.asarray(Image.open(single))
        )

    rc, _, _ = run(capsys, "preprocess", "inpaint", frames, "-o", tmp_path / "inpaint", "--mask", masks)
    assert rc == 0
    for k, name in enumerate(["f8", "f9", "f10"]):  # f8 with m0, f9 with m1, f10 with m2
        alpha = np.asarray(Image.open(tmp_path / "inpaint" / f"{name}.png"))[..., 3]
        assert np.array_equal(alpha == 0, np.asarray(Image.open(masks / f"m{k}.png")) > 0)

    (masks / "m3.png").write_bytes((masks / "m0.png").read_bytes())
    rc, _, err = run(capsys, "preprocess", "inpaint", frames, "-o", tmp_path / "x", "--mask", masks)
    assert rc == 2 and "holds 4 images" in err and "paired by position" in err
    rc, _, err = run(capsys, "preprocess", "canny", frames, "-o", tmp_path / "x.png")
    assert rc == 2 and "-o names a folder" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.png").exists()


def test_detecting_at_another_size_keeps_the_maps_aspect(capsys, tmp_path):
    """The map's size for the model comes from the photo's, not from the size the annotator ran
    at: two roundings to multiples of 64 would change the aspect (4:3 -> 5:4)."""
    img = np.full((300, 400, 3), 230, np.uint8)
    cv2.rectangle(img, (100, 80), (300, 220), (200, 30, 30), -1)
    Image.fromarray(img).save(tmp_path / "photo.png")
    for name, extra in (("direct", []), ("detected", ["--detect-resolution", "256"])):
        rc, _, _ = run(
            capsys,
            "preprocess",
            "canny",
            tmp_path / "photo.png",
            "-o",
            tmp_path / f"{name}.png",
            "--resolution",
            "128",
            *extra,
        )
        assert rc == 0
    sizes = {Image.open(tmp_path / f"{n}.png").size for n in ("direct", "detected")}
    assert sizes == {(192, 128)}  # 400x300 at a short side of 128, sides in multiples of 64


def test_render_pose_reads_pixels_or_fractions_of_the_canvas(capsys, tmp_path):
    """Pose editors write pixels or 0-1 fractions of the canvas: both draw the same limb."""
    drawn = []
    for name, (a, b) in (
        ("pixels", ((20, 20), (40, 20))),
        ("fractions", ((20 / 64, 20 / 48), (40 / 64, 20 / 48))),
    ):
        pose = {"canvas_width": 64, "canvas_height": 48, "people": [{"pose_keypoints_2d": [0.0] * 54}]}
        pose["people"][0]["pose_keypoints_2d"][3:9] = [*a, 1, *b, 1]  # neck, right shoulder
        (tmp_path / f"{name}.json").write_text(json.dumps(pose))
        rc, _, _ = run(capsys, "render", "pose", tmp_path / f"{name}.json", "-o", tmp_path / f"{name}.png")
        assert rc == 0
        drawn.append(np.asarray(Image.open(tmp_path / f"{name}.png")))
    assert drawn[0][20, 30].tolist() == [153, 0, 0] and np.array_equal(drawn[0], drawn[1])
    huge = {"canvas_width": 100000, "canvas_height": 48, "people": []}
    (tmp_path / "huge.json").write_text(json.dumps(huge))
    rc, _, err = run(capsys, "render", "pose", tmp_path / "huge.json", "-o", tmp_path / "huge.png")
    assert rc == 2 and "100000x48 is not 1-4096 pixels a side" in err
