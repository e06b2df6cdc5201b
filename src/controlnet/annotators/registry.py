"""Typed annotator parameters and the :class:`Annotator` record the registry holds.

Every condition kind registers one or more :class:`Annotator` entries. An entry knows its name,
its parameters (type, default, range), whether it needs a weight file the user downloads, how its
maps resize (nearest for label and pose maps) and whether the model reads ``1 - map`` (line art).
The CLI, the generator and the web app all go through these records, so a parameter is validated
the same way wherever it comes from: a Python call, ``--param key=value`` or an HTTP form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .utils import hwc3

__all__ = ["Annotator", "Param", "ParamType"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ParamType(Enum):
    """The value type of a parameter."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    CHOICE = "choice"


@dataclass(frozen=True)
class Param:
    """One annotator parameter.

    ``minimum``/``maximum`` bound INT and FLOAT values (inclusive); ``choices`` lists the values of
    a CHOICE parameter.
    """

    name: str
    type: ParamType
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type is ParamType.CHOICE and self.default not in self.choices:
            raise ValueError(f"param {self.name}: default {self.default!r} is not one of {self.choices}")

    def range_text(self) -> str:
        """The allowed values in words: '[0, 255]', 'one of a, b', 'true/false' or ''."""
        if self.type is ParamType.CHOICE:
            return "one of " + ", ".join(self.choices)
        if self.type is ParamType.BOOL:
            return "true/false"
        if self.minimum is None and self.maximum is None:
            return ""
        lo = "-inf" if self.minimum is None else _num(self.minimum)
        hi = "inf" if self.maximum is None else _num(self.maximum)
        return f"[{lo}, {hi}]"

    def check(self, value: Any) -> Any:
        """``value`` converted to this parameter's type; ValueError naming the parameter otherwise."""
        t = self.type
        if t is ParamType.BOOL:
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise ValueError(f"param {self.name} must be true or false, got {value!r}")
        if t is ParamType.STR:
            if isinstance(value, str):
                return value
            if hasattr(value, "__fspath__"):
                return str(value)
            raise ValueError(f"param {self.name} must be a string, got {value!r}")
        if t is ParamType.CHOICE:
            if value in self.choices:
                return value
            raise ValueError(f"param {self.name} must be {self.range_text()}, got {value!r}")
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"param {self.name} must be a number, got {value!r}")
        if t is ParamType.INT:
            if float(value) != int(value):
                raise ValueError(f"param {self.name} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"param {self.name} must be finite, got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise ValueError(f"param {self.name}={_num(value)} is out of range {self.range_text()}")
        return value

    def parse(self, text: str) -> Any:
        """Parse the text form (as in ``key=value``) and check it."""
        t = self.type
        s = text.strip()
        if t is ParamType.BOOL:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError(f"param {self.name} must be true or false, got {text!r}")
        if t in (ParamType.STR, ParamType.CHOICE):
            return self.check(s)
        try:
            value: float = int(s) if t is ParamType.INT else float(s)
        except ValueError:
            kind = "an integer" if t is ParamType.INT else "a number"
            raise ValueError(f"param {self.name} must be {kind}, got {text!r}") from None
        return self.check(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Annotator:
    """A named condition maker: ``annotator(image, **params) -> map``.

    image: HxWx3 uint8 RGB (grey and RGBA images are accepted and go through :func:`hwc3`).
    Returns an HxWx3 uint8 map of the same size, or HxWx4 (RGBA) for inpainting, whose alpha is 0
    on the masked pixels.

    Attributes:
        fn: the function doing the work; it receives the image, the checked parameters (defaults
            filled in) and the extra inputs named in ``inputs``.
        params: the typed parameters.
        needs_weights: the user must supply a weight file or folder (the ``weights`` parameter).
        nearest: maps are label/pose maps: resize them with nearest-neighbour only.
        model_invert: the model is fed ``1 - map`` (v1.1 line art).
        inputs: extra array inputs besides the image, e.g. ``("mask",)`` for inpainting.
        pad: the value its maps are padded with when fitted to another aspect (None: the map's
            border colour); repaint maps pad with 0, the pixels to paint (outpainting).
    """

    name: str
    description: str
    fn: Callable[..., np.ndarray]
    params: tuple[Param, ...] = ()
    needs_weights: bool = False
    nearest: bool = False
    model_invert: bool = False
    inputs: tuple[str, ...] = ()
    pad: float | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(f"annotator {self.name} has no param {name!r}; {self._known()}")

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def _known(self) -> str:
        names = [p.name for p in self.params]
        return f"known params: {', '.join(names)}" if names else "it takes no params"

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params``, each checked; unknown names raise ValueError."""
        out = self.defaults
        for key, value in params.items():
            out[key] = self.param(key).check(value)
        return out

    def parse_params(self, pairs: Iterable[str]) -> dict[str, Any]:
        """``["key=value", ...]`` -> typed values (only the given keys; defaults are not added)."""
        out: dict[str, Any] = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"param {pair!r} is not key=value")
            out[key] = self.param(key).parse(text)
        return out

    def __call__(self, image: np.ndarray, **kwargs: Any) -> np.ndarray:
        extra = {k: kwargs.pop(k) for k in self.inputs if k in kwargs}
        params = self.check_params(kwargs)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"{self.name}: the image must be a uint8 numpy array (HxWx3 RGB)")
        out = self.fn(hwc3(image), **params, **extra)
        return out if out.ndim == 3 and out.shape[2] == 4 else hwc3(out)
