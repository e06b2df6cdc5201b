"""The outlines world: several shapes of every kind per image, drawn deterministically; its records
redraw it exactly; its prompts name each shape's colour in paint order; its scores tell a model that
follows the outlines from one that paints a disk."""

import itertools
import json

import cv2
import numpy as np
import pytest

from controlnet.cli import main
from controlnet.data import pairset
from controlnet.data.colors import delta_e, rgb, srgb_to_lab
from controlnet.data.fill50k import generate as generate_fill50k
from controlnet.data.fill50k import sample_params
from controlnet.data.outlines import (
    FigureKind,
    generate_outlines,
    parse_outline_prompt,
    read_outline_samples,
    render_outlines,
    sample_outlines,
    samples_of,
    visible_masks,
)
from controlnet.evaluation.metrics import outline_scores
from controlnet.imageio import read_image, sha256_file


@pytest.fixture(scope="module")
def samples():
    return sample_outlines(300, size=128, seed=11)


def _fill(figure, size):
    mask = np.zeros((size, size), np.uint8)
    pts = np.round(figure.vertices() * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def test_samples_depend_on_seed_and_index_alone(monkeypatch):
    monkeypatch.setattr(pairset, "_BLOCK", 4)  # several processes share the work
    many = sample_outlines(40, size=64, seed=3, workers=2)
    assert sample_outlines(10, size=64, seed=3) == many[:10]
    assert sample_outlines(10, size=64, seed=4) != many[:10]


def test_the_world_has_every_kind_count_width_size_and_arrangement(samples):
    kinds = {f.kind for s in samples for f in s.figures}
    assert kinds == set(FigureKind)
    assert {len(s.figures) for s in samples} == {1, 2, 3, 4}
    assert {s.line_width for s in samples} == {1, 2}
    radii = [f.radius for s in samples for f in s.figures]
    assert min(radii) < 0.05 * 128 and max(radii) > 0.4 * 128  # tiny to filling the frame
    nested = crossing = 0
    for s in samples:
        for a, b in itertools.combinations(s.figures, 2):  # a is painted first: the larger
            fa, fb = _fill(a, s.size), _fill(b, s.size)
            overlap = (fa & fb).sum()
            if overlap == fb.sum():
                nested += 1
            elif overlap:
                crossing += 1
    assert nested >= 20 and crossing >= 20


def test_every_shape_is_whole_visible_and_in_its_own_colour(samples):
    for s in samples[:80]:
        source, target = render_outlines(s)
        lit = source.max(-1) > 0
        assert not (lit[0].any() or lit[-1].any() or lit[:, 0].any() or lit[:, -1].any())  # inside the frame
        areas = [_fill(f, s.size).sum() for f in s.figures]
        assert areas == sorted(areas, reverse=True)  # painted larger first
        labs = srgb_to_lab(np.array([rgb(f.color) for f in s.figures] + [rgb(s.background)], np.uint8))
        assert all(delta_e(x, y) >= 15 for x, y in itertools.combinations(labs, 2))
        seen = np.zeros(target.shape[:2], bool)
        for f, v, area in zip(s.figures, visible_masks(s), areas):
            assert v.sum() >= 0.3 * area
            assert (target[v] == rgb(f.color)).all()
            seen |= v
        assert (target[~seen] == rgb(s.background)).all()
        assert lit.sum() > 0


def test_records_redraw_the_written_files_exactly(tmp_path):
    out = generate_outlines(tmp_path / "set", 24, size=64, seed=2, workers=1, progress=False)
    again = generate_outlines(tmp_path / "again", 24, size=64, seed=2, workers=2, progress=False)
    assert sha256_file(out) == sha256_file(again)
    read = read_outline_samples(out)
    assert read == sample_outlines(24, size=64, seed=2)
    for s in read:
        source, target = render_outlines(s)
        assert np.array_equal(read_image(out / f"source/{s.index}.png"), source)
        assert np.array_equal(read_image(out / f"target/{s.index}.png"), target)
    options = json.loads((out / "generator.json").read_text())
    assert options["format"] == "controlnet-outlines/1" and options["kinds"] == [k.value for k in FigureKind]


def test_prompts_name_each_shape_in_paint_order(samples):
    for s in samples:
        shapes, background = parse_outline_prompt(s.prompt)
        assert shapes == [(f.color, f.name) for f in s.figures] and background == s.background
    one = next(s for s in samples if len(s.figures) == 1)
    assert " and " not in one.prompt and one.prompt.endswith(f"with {one.background} background")
    fill50k = sample_params(1, size=64, seed=0)[0].prompt  # the fill50k form reads too
    assert parse_outline_prompt(fill50k)[0][0][1] == "circle"
    with pytest.raises(ValueError, match="names no shape"):
        parse_outline_prompt("red dragon and blue circle with white background")


def test_kinds_can_be_chosen_and_held_out():
    stars = sample_outlines(30, size=64, seed=0, kinds=["star"])
    assert {f.kind for s in stars for f in s.figures} == {FigureKind.STAR}
    rest = sample_outlines(60, size=64, seed=0, kinds=[k for k in FigureKind if k is not FigureKind.STAR])
    assert FigureKind.STAR not in {f.kind for s in rest for f in s.figures}
    with pytest.raises(ValueError, match="unknown shape kind 'hexagon'; expected some of circle"):
        sample_outlines(3, kinds=["hexagon"])
    with pytest.raises(ValueError, match="at least 32"):
        sample_outlines(3, size=16)
    with pytest.raises(ValueError, match="max_line_width must be between 1 and 4"):
        sample_outlines(3, size=64, max_line_width=9)


def test_scores_tell_following_from_painting_a_disk(samples):
    s = next(s for s in samples if len(s.figures) >= 3)
    _, target = render_outlines(s)
    colours = [rgb(f.color) for f in s.figures]
    visible = visible_masks(s)
    perfect = outline_scores(target, visible, colours, rgb(s.background))
    assert perfect == {
        "iou": 1.0,
        "shape_iou": 1.0,
        "shape_colour_ok": 1.0,
        "background_colour_ok": 1.0,
        "colour_accuracy": 1.0,
    }
    disk = np.empty_like(target)
    disk[:] = rgb(s.background)
    cv2.circle(disk, (64, 64), 30, colours[0], -1)
    scored = outline_scores(disk, visible, colours, rgb(s.background))
    assert scored["shape_iou"] < 0.5 and scored["shape_colour_ok"] < 1.0
    swapped = target.copy()  # right regions, two shapes' colours exchanged
    swapped[visible[0]], swapped[visible[1]] = colours[1], colours[0]
    scored = outline_scores(swapped, visible, colours, rgb(s.background))
    assert scored["iou"] == 1.0 and scored["shape_colour_ok"] <= 1 - 2 / len(colours)
    with pytest.raises(ValueError, match="2 regions for 3 colours"):
        outline_scores(target, visible[:2], colours[:3], rgb(s.background))


def test_an_opened_set_finds_its_shapes_and_other_sets_are_named(tmp_path):
    from controlnet.data import open_dataset

    out = generate_outlines(tmp_path / "set", 6, size=64, seed=1, workers=1, progress=False)
    assert samples_of(open_dataset(out)) == read_outline_samples(out)
    other = generate_fill50k(tmp_path / "fill", 2, size=64, progress=False, workers=1)
    with pytest.raises(ValueError, match="fill: not a set written by `controlnet data outlines`"):
        samples_of(open_dataset(other))


def test_cli_writes_the_set_and_refuses_bad_kinds(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "outlines", "--out", str(out), "--n", "5", "--size", "64", "--kinds", "circle,star"]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert {f.kind for s in read_outline_samples(out) for f in s.figures} <= {
        FigureKind.CIRCLE,
        FigureKind.STAR,
    }
    assert main([*args, "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "outlines", "--out", str(tmp_path / "x"), "--kinds", "circle,dragon"]) == 2
    err = capsys.readouterr().err
    assert "unknown shape kind 'dragon'" in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_eval_scores_an_outlines_set_with_the_bundled_model(tmp_path, capsys):
    data = generate_outlines(tmp_path / "set", 2, size=64, seed=9, max_shapes=2, workers=1, progress=False)
    args = ["eval", "--data", str(data), "--out", str(tmp_path / "ev"), "--n", "2", "--steps", "2"]
    assert main([*args, "--metric", "outlines", "--batch", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())["summary"]
    assert {"iou", "shape_iou", "shape_colour_ok", "colour_accuracy"} <= set(summary)
    assert all(0.0 <= summary[k] <= 1.0 for k in ("iou", "shape_iou", "colour_accuracy"))
    capsys.readouterr()
    wrong_size = [*args, "--metric", "outlines", "--resolution", "32", "--quiet"]
    assert main(wrong_size) == 2
    assert "scored at their set's own size (64 px)" in capsys.readouterr().err


def test_free_iou_follows_the_shapes_whatever_their_colours(samples):
    """For the no-prompt setting: the pixels unlike the border's colour against the shapes' union,
    untouched by which colour each shape took."""
    from controlnet.evaluation.evaluate import outline_item_scores

    s = next(s for s in samples if len(s.figures) >= 2)
    _, target = render_outlines(s)
    colours = [rgb(f.color) for f in s.figures]
    visible = visible_masks(s)
    assert outline_item_scores(target, s)["free_iou"] == 1.0
    swapped = target.copy()
    swapped[visible[0]], swapped[visible[1]] = colours[1], colours[0]
    scored = outline_item_scores(swapped, s)
    assert scored["free_iou"] == 1.0 and scored["shape_colour_ok"] < 1.0
    blank = np.empty_like(target)
    blank[:] = rgb(s.background)
    assert outline_item_scores(blank, s)["free_iou"] == 0.0


def test_scores_by_size_class_pool_the_shapes_of_every_image(samples):
    """The summary's size classes (a shape's visible share of the image): each shape counts once,
    whatever image it is in; an output that loses the tiny shapes (painted over in the background's
    colour) scores 0 on them and 1 on the rest; a validation scorer leaves the classes out."""
    from controlnet.evaluation.evaluate import SIZE_CLASSES, _summary, outline_item_scores

    rows, tiny = [], 0
    for s in samples[:80]:
        _, target = render_outlines(s)
        out = target.copy()
        for v in visible_masks(s):
            if v.sum() / v.size < SIZE_CLASSES[0][1]:
                out[v] = rgb(s.background)
                tiny += 1
        rows.append(outline_item_scores(out, s))
    summary = _summary(rows)
    assert tiny >= 5 and summary["shape_colour_ok_tiny"] == summary["shape_iou_tiny"] == 0.0
    assert summary["shape_colour_ok_small"] == summary["shape_colour_ok_large"] == 1.0
    assert summary["shape_iou_small"] == summary["shape_iou_large"] == 1.0
    assert 0 < summary["shape_colour_ok"] < 1
    # pooled: one image's tiny shape in its colour, another's three not: 1 of 4, not (1 + 0) / 2
    one = {"share": 0.001, "iou": 1.0, "colour_ok": 1.0}
    lost = {"share": 0.001, "iou": 0.0, "colour_ok": 0.0}
    pooled = _summary([{"iou": 1.0, "shapes": [one]}, {"iou": 0.5, "shapes": [lost] * 3}])
    assert pooled["shape_colour_ok_tiny"] == 0.25 and "shape_colour_ok_large" not in pooled
    assert "shape_colour_ok_tiny" not in _summary(rows, by_size=False)
