"""The size of the images a request makes: explicit, from the first image's aspect, or square,
and enlarged by the hires fix. The check (:mod:`.check`) and the generation share these rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..annotators.utils import model_size
from ..choices import MAX_SIDE

if TYPE_CHECKING:
    from .check import CheckedRequest

__all__ = ["enlarged_size", "final_size", "first_image", "output_size"]


def first_image(checked: CheckedRequest) -> str | None:
    """The input that sets the output's aspect (and is captioned): the init image, else control 0's."""
    for name in ("init_image", "controls[0].image"):
        if name in checked.images:
            return name
    return None


def output_size(checked: CheckedRequest, native: int) -> tuple[int, int]:
    """(H, W) of the images the request makes: an explicit width and height (multiples of 64),
    else the first image's aspect with the short side at the resolution (default ``native``), else
    square."""
    req = checked.request
    if req.width is not None and req.height is not None:
        return max(64, round(req.height / 64) * 64), max(64, round(req.width / 64) * 64)
    side = req.resolution or native
    first = first_image(checked)
    if first is None:
        return side, side
    h, w = checked.images[first].shape[:2]
    return model_size(h, w, side)


def enlarged_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) ``size`` enlarged ``scale`` times by the hires fix, to the nearest multiples of 64."""
    return tuple(max(64, int(v * scale / 64 + 0.5) * 64) for v in size)  # type: ignore[return-value]


def final_size(checked: CheckedRequest, native: int) -> tuple[int, int]:
    """(H, W) of the images the request returns: :func:`output_size`, enlarged by the hires fix
    when it is on (an error if a side would pass the largest)."""
    req = checked.request
    h, w = output_size(checked, native)
    if req.hires_scale == 1.0:
        return h, w
    h, w = enlarged_size((h, w), req.hires_scale)
    if max(h, w) > MAX_SIDE:
        raise ValueError(
            f"hires_scale {req.hires_scale:g} would make {w}x{h} images; the sides must stay within "
            f"{MAX_SIDE} pixels"
        )
    return h, w
