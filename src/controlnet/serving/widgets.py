"""Gradio widgets made from declarations: a request field's widget from its schema (range,
default, label, help), an annotator parameter's from its registry record, and image uploads that
fail with a one-line message. The web app places them; what they show comes from here."""

from __future__ import annotations

import logging
import math
import typing
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from ..annotators import Param, ParamType, hwc3
from ..schema import enum_of, params
from .service import BusyError, Service

__all__ = [
    "Unreadable",
    "checked_upload",
    "editor_images",
    "field_value",
    "field_widget",
    "param_events",
    "param_widget",
    "upload",
    "user_error",
]

log = logging.getLogger(__name__)
_SLIDER_SPAN = 1000  # wider numeric ranges get a number box instead of a slider
_UNSET: Any = object()


def field_widget(
    cls: type,
    name: str,
    *,
    value: Any = _UNSET,
    minimum: float | None = None,
    maximum: float | None = None,
    step: float | None = None,
    label: str | None = None,
    elem_id: str | None = None,
    **extra: Any,
) -> gr.components.Component:
    """The widget of request field ``name`` of ``cls``: its label, help and default, and for a
    number its bounds (the overrides narrow them to what this page offers: a server's limit, a
    sentinel such as 0 for "as steps"). Choices are radio buttons or a dropdown, flags checkboxes,
    bounded numbers sliders, others number boxes, text a text box."""
    field, spec, tp = params(cls)[name]
    default = field.default if value is _UNSET else value
    kw: dict[str, Any] = {
        "label": label or spec.label or name,
        "info": spec.help,
        "elem_id": elem_id or name.replace("_", "-"),
        **extra,
    }
    enum = enum_of(tp)
    if enum is not None:
        choices = [e.value for e in enum]
        default = default.value if isinstance(default, enum) else default
        widget = gr.Radio if len(choices) <= 4 else gr.Dropdown
        return widget(choices, value=default, **kw)
    inner = _inner(tp)
    if inner is bool:
        return gr.Checkbox(value=default, **kw)
    if inner is str:
        return gr.Textbox(value=default, **kw)
    lo = spec.minimum if minimum is None else minimum
    hi = spec.maximum if maximum is None else maximum
    if step is None:
        step = 1 if inner is int else _float_step(lo, hi)
    if lo is not None and hi is not None and hi - lo <= _SLIDER_SPAN * step:
        return gr.Slider(minimum=lo, maximum=hi, value=default, step=step, **kw)
    return gr.Number(value=default, minimum=lo, maximum=hi, precision=0 if inner is int else None, **kw)


def field_value(cls: type, name: str, value: Any) -> Any:
    """A widget's value as request field ``name`` of ``cls`` holds it (sliders give floats)."""
    inner = _inner(params(cls)[name][2])
    if value is None or enum_of(params(cls)[name][2]) is not None:
        return value
    if inner is int:
        return round(float(value))
    return inner(value)


def _inner(tp: Any) -> Any:
    args = typing.get_args(tp)
    return next(a for a in args if a is not type(None)) if type(None) in args else tp


def param_widget(p: Param, elem_id: str | None = None) -> gr.components.Component:
    """The Gradio widget for one annotator parameter: slider, number box, checkbox, dropdown, text."""
    kw: dict[str, Any] = {"label": p.name, "info": p.help, "elem_id": elem_id}
    if p.type is ParamType.BOOL:
        return gr.Checkbox(value=p.default, **kw)
    if p.type is ParamType.CHOICE:
        return gr.Dropdown(choices=list(p.choices), value=p.default, **kw)
    if p.type is ParamType.STR:
        return gr.Textbox(value=p.default, **kw)
    lo, hi = p.minimum, p.maximum
    step = 1 if p.type is ParamType.INT else _float_step(lo, hi)
    if lo is not None and hi is not None and hi - lo <= _SLIDER_SPAN:
        return gr.Slider(minimum=lo, maximum=hi, value=p.default, step=step, **kw)
    return gr.Number(value=p.default, minimum=lo, maximum=hi, precision=0 if step == 1 else None, **kw)


def _float_step(lo: float | None, hi: float | None) -> float:
    if lo is None or hi is None:
        return 0.01
    return 10.0 ** math.floor(math.log10(max(hi - lo, 1e-6) / 200))


@dataclass(frozen=True)
class Unreadable:
    """An upload Gradio could not open as an image; an error only if the image is used."""

    message: str


def checked_upload(image: gr.Image, what: str) -> gr.Image:
    """Make an upload that is not an image at all arrive as :class:`Unreadable` (a one-line message
    naming the input) instead of failing every event that reads the widget with Gradio's own
    processing error, even when the image is not used (say, while the unit draws instead).
    Readable files are then checked by :meth:`Service.store_image` like every other upload.

    Set on this one widget instance: subclassing a Gradio component would make Gradio write a
    ``.pyi`` stub next to this module at import time. So never send the widget an update (say, of
    its visibility): Gradio would replace it in the session with a plain copy; update a box around
    it instead.
    """
    preprocess = image.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception as e:
            return Unreadable(f"{what}: not an image ({type(e).__name__})")

    image.preprocess = checked  # type: ignore[method-assign]
    return image


def param_events(widget: gr.components.Component) -> Any:
    """The event a parameter widget fires when the user has settled on a value."""
    if isinstance(widget, gr.Slider):
        return widget.release
    if isinstance(widget, gr.Textbox):
        return widget.submit
    return widget.input


def upload(label: str, elem_id: str, what: str) -> gr.Image:
    """An image upload (a file path for the handlers), checked as :func:`checked_upload` says."""
    image = gr.Image(
        type="filepath", image_mode=None, sources=["upload", "clipboard"], label=label, elem_id=elem_id
    )
    return checked_upload(image, what)


def user_error(e: BaseException) -> gr.Error:
    if isinstance(e, (ValueError, FileNotFoundError, BusyError)):
        return gr.Error(str(e))
    log.exception("web app request failed")
    return gr.Error(f"internal error: {type(e).__name__}: {e}")


def editor_images(service: Service, value: Any) -> tuple[str | None, str | None]:
    """(init image, mask) from the masked-editing editor: its background, and the painted pixels
    of its layers (none painted: img2img on the whole image, no mask)."""
    if not isinstance(value, dict) or value.get("background") is None:
        return None, None
    background = np.asarray(value["background"])
    if background.ndim == 3 and background.shape[2] == 4 and background[..., 3].max() == 0:
        return None, None  # an empty canvas
    init = service.store_image(hwc3(background.astype(np.uint8)), "init image")  # RGBA over white
    painted = [np.asarray(layer) for layer in value.get("layers") or [] if layer is not None]
    if not painted:
        return init, None
    alpha = np.max(
        [p[..., 3] if p.ndim == 3 and p.shape[2] == 4 else p.max(axis=-1) for p in painted], axis=0
    )
    if alpha.max() == 0:
        return init, None
    return init, service.store_image(np.where(alpha > 0, 255, 0).astype(np.uint8), "mask", mask=True)
