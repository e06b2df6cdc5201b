"""The fill50k generator: determinism, layout, prompts, and images that match their recorded parameters."""

import json
import math
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnet.cli import main
from controlnet.data import fill50k, pairset
from controlnet.data.colors import color_distance, color_names, rgb
from controlnet.data.fill50k import (
    Kind,
    Shape,
    generate,
    line_width_for,
    parse_prompt,
    read_samples,
    render_sample,
    sample_params,
    shape_masks,
)
from controlnet.imageio import encode_png_fast, read_image, sha256_file

COLOUR = "|".join(re.escape(n) for n in color_names())
PROMPT = re.compile(rf"^({COLOUR}) (circle|square|triangle) with ({COLOUR}) background$")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("f") / "set", 24, size=64, seed=5, progress=False, workers=1)


def test_same_arguments_give_identical_bytes_whatever_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(pairset, "_BLOCK", 8)  # several blocks, so two processes share the work
    a = generate(tmp_path / "a", 30, size=32, seed=1, progress=False, workers=1)
    b = generate(tmp_path / "b", 30, size=32, seed=1, progress=False, workers=2)
    c = generate(tmp_path / "c", 30, size=32, seed=2, progress=False, workers=1)
    assert sha256_file(a) == sha256_file(b)
    assert (a / "prompt.json").read_bytes() != (c / "prompt.json").read_bytes()
    assert (a / "target/0.png").read_bytes() != (c / "target/0.png").read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_layout_is_the_released_one(small_set):
    lines = (small_set / "prompt.json").read_text().splitlines()
    assert len(lines) == 24
    for i, line in enumerate(lines):
        record = json.loads(line)
        assert list(record)[:3] == ["source", "target", "prompt"]
        assert record["source"] == f"source/{i}.png" and record["target"] == f"target/{i}.png"
        for key in ("source", "target"):
            image = read_image(small_set / record[key])
            assert image.shape == (64, 64, 3)
    options = json.loads((small_set / "generator.json").read_text())
    assert options == {**options, "n": 24, "size": 64, "seed": 5, "kind": "circle"}


def test_prompts_name_two_distinct_distant_colours(small_set):
    for s in read_samples(small_set):
        m = PROMPT.match(s.prompt)
        assert m and m.group(2) == "circle", s.prompt
        assert (m.group(1), m.group(3)) == (s.color, s.background)
        assert color_distance(s.color, s.background) >= fill50k.DEFAULT_MIN_DELTA_E


def test_images_match_the_recorded_parameters(small_set):
    for s in read_samples(small_set):
        source = read_image(small_set / f"source/{s.index}.png")
        target = read_image(small_set / f"target/{s.index}.png")
        # target: exactly two colours, the named ones; the filled region is the recorded disc
        filled = np.all(target == rgb(s.color), axis=-1)
        assert np.all(filled | np.all(target == rgb(s.background), axis=-1))
        assert np.array_equal(filled, shape_masks(s)[0])
        disc = np.zeros((s.size, s.size), np.uint8)  # an independent rasterisation of the same circle
        cv2.circle(disc, s.center, s.radius, 1, thickness=-1, lineType=cv2.LINE_8)
        iou = (filled & (disc > 0)).sum() / (filled | (disc > 0)).sum()
        assert iou > 0.9, (s, iou)
        # source: a white outline on black, on the circle's edge, tracing the whole filled boundary
        white = np.all(source == 255, axis=-1)
        assert np.all(white | np.all(source == 0, axis=-1))
        ys, xs = np.nonzero(white)
        d = np.hypot(xs - s.center[0], ys - s.center[1])
        assert np.all(np.abs(d - s.radius) <= s.line_width / 2 + 1e-9)
        edge = filled & ~cv2.erode(filled.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        near = cv2.dilate(white.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert np.all(near[edge])


def test_shapes_have_their_area_and_stay_inside():
    samples = sample_params(60, size=256, seed=0, kind="shapes")
    assert {s.shape for s in samples} == set(Shape)
    area = {Shape.CIRCLE: math.pi, Shape.SQUARE: 2.0, Shape.TRIANGLE: 3 * math.sqrt(3) / 4}
    for s in samples:
        assert PROMPT.match(s.prompt).group(2) == s.shape.value
        fill, outline = shape_masks(s)
        assert fill.sum() == pytest.approx(area[s.shape] * s.radius**2, rel=0.06)
        assert not (outline[0].any() or outline[-1].any() or outline[:, 0].any() or outline[:, -1].any())
        source, target = render_sample(s)
        assert np.array_equal(np.all(source == 255, -1), outline)
        assert np.array_equal(np.all(target == rgb(s.color), -1), fill)


def test_a_sample_does_not_depend_on_the_set_size():
    assert sample_params(40, 64, 3)[:7] == sample_params(7, 64, 3)


def test_kinds_share_centres_radii_and_colours():
    circles, shapes = sample_params(20, 128, 7, Kind.CIRCLE), sample_params(20, 128, 7, Kind.SHAPES)
    for c, s in zip(circles, shapes):
        assert (c.center, c.radius, c.color, c.background) == (s.center, s.radius, s.color, s.background)


def test_line_width_scales_with_size():
    assert [line_width_for(s) for s in (64, 128, 256, 512, 1024)] == [1, 1, 2, 3, 6]


def test_parameters_round_trip_through_prompt_json(small_set):
    assert read_samples(small_set / "prompt.json") == sample_params(24, size=64, seed=5)


def test_parse_prompt_reads_released_prompts():
    assert parse_prompt("cornflower blue circle with light golden rod yellow background") == (
        "cornflower blue",
        Shape.CIRCLE,
        "light golden rod yellow",
    )
    with pytest.raises(ValueError, match="not a fill50k prompt"):
        parse_prompt("a photo of a cat")


def test_released_style_lines_have_no_parameters(tmp_path):
    (tmp_path / "prompt.json").write_text(
        json.dumps(
            {"source": "source/0.png", "target": "target/0.png", "prompt": "aqua circle with red background"}
        )
        + "\n"
    )
    with pytest.raises(ValueError, match=r"prompt.json line 1: missing 'shape', 'center'"):
        read_samples(tmp_path)


def test_existing_folders_are_kept_unless_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        generate(out, 3, size=32, progress=False)
    assert (out / "keep.txt").read_text() == "mine"

    def broken(sample):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fill50k, "render_sample", broken)
    with pytest.raises(RuntimeError):
        generate(out, 3, size=32, progress=False, overwrite=True, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and (out / "keep.txt").exists()
    monkeypatch.undo()
    generate(out, 3, size=32, progress=False, overwrite=True, workers=1)
    assert not (out / "keep.txt").exists() and len(list((out / "target").iterdir())) == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 32"):
        sample_params(3, size=16)
    with pytest.raises(ValueError):
        sample_params(3, kind="hexagons")
    with pytest.raises(ValueError, match="lower min_delta_e"):
        sample_params(3, min_delta_e=1000)


def test_cli_writes_the_set_and_prints_its_path(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "fill50k", "--out", str(out), "--n", "4", "--size", "32", "--kind", "shapes", "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len((out / "prompt.json").read_text().splitlines()) == 4
    assert main(args) == 2  # exists: one clear line, exit 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(7, 5, 3), (6, 9)])
def test_fast_png_encoder_round_trips(tmp_path, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(encode_png_fast(image))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)
    assert np.array_equal(
        read_image(tmp_path / "a.png"), image if image.ndim == 3 else np.stack([image] * 3, -1)
    )
    with pytest.raises(ValueError, match="uint8"):
        encode_png_fast(image.astype(np.float32))
