"""The CSS named colours as fill50k prompts spell them, and perceptual colour distances.

fill50k prompts name colours by their CSS keyword split into words at the capitals of the usual
CamelCase spelling ("PaleGoldenRod" -> "pale golden rod", "OldLace" -> "old lace",
"LightGoldenRodYellow" -> "light golden rod yellow"). The table holds the 148 CSS keywords less the
seven "grey" spellings (same RGB as their "gray" twins; :func:`rgb` still accepts them): 141
names. Two more pairs share an RGB value and stay, because both names are common: aqua = cyan and
fuchsia = magenta; :func:`nearest_color` answers the first of each pair (aqua, fuchsia), so compare
colours by value (:func:`same_color`, :func:`color_distance`), not by name.

Distances are CIE Lab (D65) delta E: CIEDE2000 by default (about 1 = a just noticeable
difference, over 10 = clearly different colours), or CIE76 (Euclidean Lab distance).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "COLORS",
    "DeltaE",
    "color_distance",
    "color_name",
    "color_names",
    "css_keyword",
    "delta_e",
    "distinct_pairs",
    "nearest_color",
    "nearest_colors",
    "rgb",
    "same_color",
    "srgb_to_lab",
]

DeltaE = Literal["ciede2000", "cie76"]

#: (name as prompt words, (R, G, B)), sorted by CSS keyword.
COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("alice blue", (240, 248, 255)),
    ("antique white", (250, 235, 215)),
    ("aqua", (0, 255, 255)),
    ("aquamarine", (127, 255, 212)),
    ("azure", (240, 255, 255)),
    ("beige", (245, 245, 220)),
    ("bisque", (255, 228, 196)),
    ("black", (0, 0, 0)),
    ("blanched almond", (255, 235, 205)),
    ("blue", (0, 0, 255)),
    ("blue violet", (138, 43, 226)),
    ("brown", (165, 42, 42)),
    ("burly wood", (222, 184, 135)),
    ("cadet blue", (95, 158, 160)),
    ("chartreuse", (127, 255, 0)),
    ("chocolate", (210, 105, 30)),
    ("coral", (255, 127, 80)),
    ("cornflower blue", (100, 149, 237)),
    ("cornsilk", (255, 248, 220)),
    ("crimson", (220, 20, 60)),
    ("cyan", (0, 255, 255)),
    ("dark blue", (0, 0, 139)),
    ("dark cyan", (0, 139, 139)),
    ("dark golden rod", (184, 134, 11)),
    ("dark gray", (169, 169, 169)),
    ("dark green", (0, 100, 0)),
    ("dark khaki", (189, 183, 107)),
    ("dark magenta", (139, 0, 139)),
    ("dark olive green", (85, 107, 47)),
    ("dark orange", (255, 140, 0)),
    ("dark orchid", (153, 50, 204)),
    ("dark red", (139, 0, 0)),
    ("dark salmon", (233, 150, 122)),
    ("dark sea green", (143, 188, 143)),
    ("dark slate blue", (72, 61, 139)),
    ("dark slate gray", (47, 79, 79)),
    ("dark turquoise", (0, 206, 209)),
    ("dark violet", (148, 0, 211)),
    ("deep pink", (255, 20, 147)),
    ("deep sky blue", (0, 191, 255)),
    ("dim gray", (105, 105, 105)),
    ("dodger blue", (30, 144, 255)),
    ("fire brick", (178, 34, 34)),
    ("floral white", (255, 250, 240)),
    ("forest green", (34, 139, 34)),
    ("fuchsia", (255, 0, 255)),
    ("gainsboro", (220, 220, 220)),
    ("ghost white", (248, 248, 255)),
    ("gold", (255, 215, 0)),
    ("golden rod", (218, 165, 32)),
    ("gray", (128, 128, 128)),
    ("green", (0, 128, 0)),
    ("green yellow", (173, 255, 47)),
    ("honey dew", (240, 255, 240)),
    ("hot pink", (255, 105, 180)),
    ("indian red", (205, 92, 92)),
    ("indigo", (75, 0, 130)),
    ("ivory", (255, 255, 240)),
    ("khaki", (240, 230, 140)),
    ("lavender", (230, 230, 250)),
    ("lavender blush", (255, 240, 245)),
    ("lawn green", (124, 252, 0)),
    ("lemon chiffon", (255, 250, 205)),
    ("light blue", (173, 216, 230)),
    ("light coral", (240, 128, 128)),
    ("light cyan", (224, 255, 255)),
    ("light golden rod yellow", (250, 250, 210)),
    ("light gray", (211, 211, 211)),
    ("light green", (144, 238, 144)),
    ("light pink", (255, 182, 193)),
    ("light salmon", (255, 160, 122)),
    ("light sea green", (32, 178, 170)),
    ("light sky blue", (135, 206, 250)),
    ("light slate gray", (119, 136, 153)),
    ("light steel blue", (176, 196, 222)),
    ("light yellow", (255, 255, 224)),
    ("lime", (0, 255, 0)),
    ("lime green", (50, 205, 50)),
    ("linen", (250, 240, 230)),
    ("magenta", (255, 0, 255)),
    ("maroon", (128, 0, 0)),
    ("medium aqua marine", (102, 205, 170)),
    ("medium blue", (0, 0, 205)),
    ("medium orchid", (186, 85, 211)),
    ("medium purple", (147, 112, 219)),
    ("medium sea green", (60, 179, 113)),
    ("medium slate blue", (123, 104, 238)),
    ("medium spring green", (0, 250, 154)),
    ("medium turquoise", (72, 209, 204)),
    ("medium violet red", (199, 21, 133)),
    ("midnight blue", (25, 25, 112)),
    ("mint cream", (245, 255, 250)),
    ("misty rose", (255, 228, 225)),
    ("moccasin", (255, 228, 181)),
    ("navajo white", (255, 222, 173)),
    ("navy", (0, 0, 128)),
    ("old lace", (253, 245, 230)),
    ("olive", (128, 128, 0)),
    ("olive drab", (107, 142, 35)),
    ("orange", (255, 165, 0)),
    ("orange red", (255, 69, 0)),
    ("orchid", (218, 112, 214)),
    ("pale golden rod", (238, 232, 170)),
    ("pale green", (152, 251, 152)),
    ("pale turquoise", (175, 238, 238)),
    ("pale violet red", (219, 112, 147)),
    ("papaya whip", (255, 239, 213)),
    ("peach puff", (255, 218, 185)),
    ("peru", (205, 133, 63)),
    ("pink", (255, 192, 203)),
    ("plum", (221, 160, 221)),
    ("powder blue", (176, 224, 230)),
    ("purple", (128, 0, 128)),
    ("rebecca purple", (102, 51, 153)),
    ("red", (255, 0, 0)),
    ("rosy brown", (188, 143, 143)),
    ("royal blue", (65, 105, 225)),
    ("saddle brown", (139, 69, 19)),
    ("salmon", (250, 128, 114)),
    ("sandy brown", (244, 164, 96)),
    ("sea green", (46, 139, 87)),
    ("sea shell", (255, 245, 238)),
    ("sienna", (160, 82, 45)),
    ("silver", (192, 192, 192)),
    ("sky blue", (135, 206, 235)),
    ("slate blue", (106, 90, 205)),
    ("slate gray", (112, 128, 144)),
    ("snow", (255, 250, 250)),
    ("spring green", (0, 255, 127)),
    ("steel blue", (70, 130, 180)),
    ("tan", (210, 180, 140)),
    ("teal", (0, 128, 128)),
    ("thistle", (216, 191, 216)),
    ("tomato", (255, 99, 71)),
    ("turquoise", (64, 224, 208)),
    ("violet", (238, 130, 238)),
    ("wheat", (245, 222, 179)),
    ("white", (255, 255, 255)),
    ("white smoke", (245, 245, 245)),
    ("yellow", (255, 255, 0)),
    ("yellow green", (154, 205, 50)),
)

_BY_KEYWORD: dict[str, tuple[str, tuple[int, int, int]]] = {
    name.replace(" ", ""): (name, v) for name, v in COLORS
}


def css_keyword(name: str) -> str:
    """Any spelling of a colour name -> its CSS keyword: "Pale Golden-Rod" -> "palegoldenrod";
    "grey" spellings become "gray"."""
    key = re.sub(r"[\s_\-]+", "", name.lower()).replace("grey", "gray")
    if key not in _BY_KEYWORD:
        close = difflib.get_close_matches(key, list(_BY_KEYWORD), n=3)
        hint = f" (did you mean {', '.join(_BY_KEYWORD[c][0] for c in close)}?)" if close else ""
        raise ValueError(f"unknown colour name {name!r}{hint}")
    return key


def color_name(name: str) -> str:
    """Any spelling of a colour name -> the table's prompt words: "PaleGoldenRod" -> "pale golden rod"."""
    return _BY_KEYWORD[css_keyword(name)][0]


def color_names() -> list[str]:
    """Every colour name, as prompt words ("alice blue", ..., "yellow green")."""
    return [name for name, _ in COLORS]


def rgb(name: str) -> tuple[int, int, int]:
    """A colour name in any spelling ("pale golden rod", "palegoldenrod", "PaleGoldenRod") -> (R, G, B)."""
    return _BY_KEYWORD[css_keyword(name)][1]


def same_color(a: str, b: str) -> bool:
    """True when two names denote the same RGB value (aqua and cyan, gray and grey)."""
    return rgb(a) == rgb(b)


def srgb_to_lab(colors: np.ndarray | Sequence[int]) -> np.ndarray:
    """sRGB (..., 3) in 0..255 (uint8 or float) -> CIE Lab (..., 3) float64, D65 white."""
    c = np.asarray(colors, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(lab1: np.ndarray, lab2: np.ndarray, method: DeltaE = "ciede2000") -> np.ndarray:
    """Colour difference of Lab colours (..., 3) and (..., 3) (broadcast) -> (...,) float64.

    ``ciede2000``: Sharma, Wu & Dalal's formulation of CIE DE2000 (kL = kC = kH = 1);
    ``cie76``: the Euclidean distance in Lab.
    """
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    if method == "cie76":
        return np.linalg.norm(lab1 - lab2, axis=-1)
    if method != "ciede2000":
        raise ValueError(f"unknown delta E method {method!r}: use 'ciede2000' or 'cie76'")
    (l1, a1, b1), (l2, a2, b2) = np.moveaxis(lab1, -1, 0), np.moveaxis(lab2, -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma0 = (c1p * c2p) == 0

    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma0, 0.0, dh)
    d_l, d_c = l2 - l1, c2p - c1p
    d_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)

    l_mean, cp_mean = (l1 + l2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(
        np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)
    )
    h_mean = np.where(chroma0, h_sum, h_mean)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_mean - 30))
        + 0.24 * np.cos(np.radians(2 * h_mean))
        + 0.32 * np.cos(np.radians(3 * h_mean + 6))
        - 0.20 * np.cos(np.radians(4 * h_mean - 63))
    )
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    tl, tc, th = d_l / s_l, d_c / s_c, d_h / s_h
    return np.sqrt(tl**2 + tc**2 + th**2 + r_t * tc * th)


def color_distance(
    a: str | Sequence[int] | np.ndarray, b: str | Sequence[int] | np.ndarray, method: DeltaE = "ciede2000"
) -> np.ndarray | float:
    """Delta E between two colours, each a name or sRGB values (..., 3) in 0..255."""
    la = srgb_to_lab(rgb(a) if isinstance(a, str) else a)
    lb = srgb_to_lab(rgb(b) if isinstance(b, str) else b)
    d = delta_e(la, lb, method)
    return float(d) if d.ndim == 0 else d


@functools.cache
def _table_lab() -> np.ndarray:
    return srgb_to_lab(np.array([v for _, v in COLORS]))


@functools.cache
def distinct_pairs(min_delta_e: float) -> np.ndarray:
    """(P, 2) indices into :data:`COLORS` of the ordered pairs of colours at least ``min_delta_e``
    (CIEDE2000) apart."""
    lab = srgb_to_lab(np.array([v for _, v in COLORS]))
    d = delta_e(lab[:, None], lab[None])
    ok = d >= min_delta_e
    np.fill_diagonal(ok, False)
    return np.argwhere(ok)


def nearest_colors(
    color: Sequence[int] | np.ndarray, k: int = 3, method: DeltaE = "ciede2000"
) -> list[tuple[str, float]]:
    """The ``k`` named colours closest to an sRGB colour (3,), closest first, with their delta E.
    Ties (aliases) keep table order."""
    d = delta_e(srgb_to_lab(color)[None], _table_lab(), method)
    order = np.argsort(d, kind="stable")[:k]
    return [(COLORS[i][0], float(d[i])) for i in order]


def nearest_color(color: Sequence[int] | np.ndarray, method: DeltaE = "ciede2000") -> str:
    """The name (prompt words) of the named colour closest to an sRGB colour (3,) in 0..255."""
    return nearest_colors(color, 1, method)[0][0]
