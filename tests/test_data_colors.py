"""Named colours: the CSS values, the fill50k word spellings, Lab and CIEDE2000 against references."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import ImageColor

from controlnet.data.colors import (
    COLORS,
    color_distance,
    color_name,
    color_names,
    css_keyword,
    delta_e,
    nearest_color,
    nearest_colors,
    rgb,
    same_color,
    srgb_to_lab,
)


def test_table_is_the_css_keywords_with_their_values():
    # Pillow carries the 148 CSS keywords; ours are the same less the 7 "grey" spellings
    keywords = {name.replace(" ", "") for name in color_names()}
    assert len(color_names()) == len(keywords) == 141
    assert keywords == {k for k in ImageColor.colormap if "grey" not in k}
    for keyword in ImageColor.colormap:  # grey spellings resolve to their gray twins
        assert rgb(keyword) == ImageColor.getrgb(keyword), keyword


@pytest.mark.parametrize(
    ("keyword", "words"),
    [
        ("palegoldenrod", "pale golden rod"),
        ("oldlace", "old lace"),
        ("lightgoldenrodyellow", "light golden rod yellow"),
        ("cornflowerblue", "cornflower blue"),
        ("lightcoral", "light coral"),
        ("aqua", "aqua"),
        ("mediumaquamarine", "medium aqua marine"),
        ("lightgrey", "light gray"),
    ],
)
def test_names_are_split_into_words_as_fill50k_prompts_use_them(keyword, words):
    assert color_name(keyword) == words
    assert css_keyword(words) == keyword.replace("grey", "gray")


def test_any_spelling_is_accepted_and_unknown_names_get_suggestions():
    assert rgb("PaleGoldenRod") == rgb("pale golden rod") == rgb("pale-golden_rod") == (238, 232, 170)
    assert same_color("aqua", "cyan") and same_color("dark grey", "darkgray")
    with pytest.raises(ValueError, match="did you mean pale golden rod"):
        rgb("pale golden rot")


def test_lab_reference_values():
    np.testing.assert_allclose(srgb_to_lab((255, 255, 255)), [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab((0, 0, 0)), [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(srgb_to_lab((255, 0, 0)), [53.2408, 80.0925, 67.2032], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab((0, 0, 255)), [32.2970, 79.1875, -107.8602], atol=1e-3)


def test_ciede2000_matches_sharma_wu_dalal_test_data():
    # pairs 1, 2, 3, 7, 17, 18, 19, 20 of the published CIEDE2000 test set
    lab1 = [[50, 2.6772, -79.7751], [50, 3.1571, -77.2803], [50, 2.8361, -74.0200], [50, 0, 0]] + [
        [50, 2.5, 0]
    ] * 4
    lab2 = [[50, 0, -82.7485]] * 3 + [[50, -1, 2], [73, 25, -18], [61, -5, 29], [56, -27, -3], [58, 24, 15]]
    expected = [2.0425, 2.8615, 3.4412, 2.3669, 27.1492, 22.8977, 31.9030, 19.4535]
    np.testing.assert_allclose(delta_e(np.array(lab1), np.array(lab2)), expected, atol=1e-4)
    np.testing.assert_allclose(delta_e(np.array(lab2), np.array(lab1)), expected, atol=1e-4)
    assert delta_e([50, 0, 0], [53, 4, 0], "cie76") == pytest.approx(5.0)


@given(st.tuples(*[st.integers(0, 255)] * 3), st.tuples(*[st.integers(0, 255)] * 3))
def test_distance_is_a_symmetric_nonnegative_dissimilarity(a, b):
    d = color_distance(a, b)
    assert d >= 0 and d == pytest.approx(color_distance(b, a), abs=1e-9)
    assert color_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_nearest_color_finds_each_named_colour_and_its_neighbourhood():
    for name, value in COLORS:
        assert same_color(nearest_color(value), name)
    assert nearest_color((250, 2, 3)) == "red"
    assert nearest_color((0, 255, 255)) == "aqua"  # aliases: the first in table order
    names = [n for n, _ in nearest_colors((0, 255, 255), k=3)]
    assert names[:2] == ["aqua", "cyan"]
