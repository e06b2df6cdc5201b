"""Line plots as PNG: tick labels, series drawn in their colours, the empty case."""

import numpy as np
from PIL import Image

from controlnet.plots import _COLOURS, _fmt, line_plot


def test_tick_labels_show_whole_numbers_plainly():
    assert [_fmt(v) for v in (0, 1000, 2500, 3000.0)] == ["0", "1000", "2500", "3000"]
    assert _fmt(0.25) == "0.25" and _fmt(0.123456) == "0.123"
    assert _fmt(2.5e7) == "2.50e+07"


def test_each_series_is_drawn_in_its_own_colour(tmp_path):
    path = line_plot(
        {"rising": ([0, 1000, 2000], [0.2, 0.5, 0.9]), "flat": ([0, 2000], [0.3, 0.3])},
        tmp_path / "p.png",
        size=(400, 300),
    )
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (300, 400, 3)
    for colour in _COLOURS[:2]:
        assert (img == colour).all(-1).sum() > 50  # the line and the legend swatch
    assert not (img == _COLOURS[2]).all(-1).any()


def test_no_finite_points_writes_a_notice_not_an_error(tmp_path):
    path = line_plot({"loss": ([1, 2], [float("nan"), float("nan")])}, tmp_path / "p.png", title="loss")
    assert Image.open(path).size == (720, 420)
