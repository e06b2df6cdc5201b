"""`controlnet demo`: the bundled model through the real loaders and pipeline, scored."""

import json

import numpy as np
from PIL import Image

from controlnet.bundled import BUNDLED_GUIDANCE
from controlnet.cli import main
from controlnet.demo import builtin_outline, run_demo
from controlnet.evaluation.metrics import fill_outline


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
