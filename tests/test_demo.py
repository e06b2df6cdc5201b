"""`controlnet demo`: a bundled model through the real loaders and pipeline, scored: the UNet stack's
(shipped) and, for the transformer stack, the same path on a flux-tiny stack of fresh weights."""

import json

import numpy as np
import pytest
from PIL import Image

from controlnet.bundled import BUNDLED_GUIDANCE, BUNDLED_MODELS, BundledModel
from controlnet.cli import main
from controlnet.data.outlines import visible_masks
from controlnet.demo import builtin_outline, builtin_outlines, run_demo
from controlnet.evaluation.metrics import fill_outline
from controlnet.formats import save_base, save_controlnet
from controlnet.formats.dit_fresh import fresh_dit_base
from controlnet.training.recipes import architecture


def test_builtin_outline_is_a_closed_circle_outline():
    cond = builtin_outline()
    assert cond.shape == (128, 128, 3) and cond.dtype == np.uint8
    assert set(np.unique(cond)) == {0, 255}
    region = fill_outline(cond)
    r = 128 * 5 // 16
    assert abs(region.sum() - np.pi * r * r) / (np.pi * r * r) < 0.05


def test_demo_follows_the_outline_and_writes_grid_and_sidecar(tmp_path):
    result = run_demo(tmp_path, samples=2, steps=20, progress=False)
    grid = Image.open(result.grid)
    assert grid.height >= 128 and grid.width >= 3 * 128  # condition | two samples
    side = json.loads(result.sidecar.read_text())
    assert side["request"]["steps"] == 20 and len(side["outputs"]["images"]) == 2
    assert side["request"]["guidance"] == BUNDLED_GUIDANCE  # the scale the bundled model does best at
    assert result.grid.name == side["outputs"]["grid"]
    # the bundled ControlNet fills the outline it is given (a broken file or key mapping would not)
    assert result.iou > 0.7
    assert result.colour_accuracy is not None and 0.0 <= result.colour_accuracy <= 1.0


def test_demo_on_a_user_outline_and_a_free_prompt(tmp_path):
    square = np.zeros((128, 128, 3), np.uint8)
    square[30:98, 30] = square[30:98, 97] = square[30, 30:98] = square[97, 30:98] = 255
    path = tmp_path / "square.png"
    Image.fromarray(square).save(path)
    result = run_demo(
        tmp_path / "out", image=path, prompt="a shape", samples=1, steps=4, guidance=9.0, progress=False
    )
    assert json.loads(result.sidecar.read_text())["request"]["guidance"] == 9.0
    assert result.colour_accuracy is None  # no fill50k colours named: IoU only
    assert 0.0 <= result.iou <= 1.0


def test_demo_cli_names_a_missing_image(tmp_path, capsys):
    assert main(["demo", "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path)]) != 0
    assert "nope.png" in capsys.readouterr().err


def test_the_transformer_demos_outline_is_three_shapes_each_seen():
    sample = builtin_outlines()
    masks = visible_masks(sample)
    assert len(masks) == 3 and all(m.sum() > 100 for m in masks)
    assert sample.prompt == "orange ellipse, royal blue pentagon and red circle with light yellow background"


@pytest.fixture(scope="module")
def flux_stack(tmp_path_factory):
    """A flux-tiny stack with fresh weights (the bundled one is trained on a GPU): what the demo
    does with it, not how well it paints."""
    d = tmp_path_factory.mktemp("flux-stack")
    arch = architecture("flux-tiny")
    base = fresh_dit_base(arch["base"], seed=0)
    save_base(base, d / "base.safetensors")
    save_controlnet(base.new_controlnet(arch["controlnet"]), d / "cn.safetensors")
    return d


def test_the_transformer_demo_scores_each_shape_in_its_colour(flux_stack, tmp_path):
    result = run_demo(
        tmp_path,
        family="flux",
        base=str(flux_stack / "base.safetensors"),
        controlnet=str(flux_stack / "cn.safetensors"),
        samples=1,
        steps=2,
        progress=False,
    )
    request = json.loads(result.sidecar.read_text())["request"]
    assert request["sampler"] == "euler" and request["steps"] == 2
    assert request["prompt"] == builtin_outlines().prompt
    assert Image.open(result.grid).width >= 2 * 128  # condition | one sample
    assert 0.0 <= result.iou <= 1.0 and result.colour_accuracy is not None


def test_a_missing_bundled_stack_is_named(monkeypatch, tmp_path, capsys):
    missing = BundledModel("no-such-base.safetensors", "no-such-cn.safetensors", "outlines")
    monkeypatch.setitem(BUNDLED_MODELS, "flux", missing)
    assert main(["demo", "--family", "flux", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no-such-base.safetensors" in err and "--base" in err and len(err.strip().splitlines()) == 1
