"""A control unit of the web app: its widgets (ControlNet, image or drawing, annotator with its
parameters and a live preview, strength, window, mode, region mask), how they read into a
:class:`~controlnet.generation.request.ControlRequest`, and its events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from ..annotators import ANNOTATORS, Annotator, Param, ParamType
from ..generation.request import ControlRequest
from ..schema import params
from .service import Service
from .widgets import (
    Unreadable,
    editor_images,
    field_value,
    field_widget,
    param_events,
    param_widget,
    upload,
    user_error,
)

__all__ = ["NONE", "Unit", "control_annotators", "control_types", "unit", "wire_unit"]

NONE = "none"  # the annotator choice for an image that already is a condition map
#: the control settings a unit shows as the schema declares them (one widget each, same name)
_SETTINGS = ("strength", "start", "end", "mode", "guess_mode")


def control_annotators() -> list[str]:
    """Annotators a control unit offers: every one. One that takes a mask (inpaint) reads the mask
    painted in the masked-editing panel."""
    return sorted(ANNOTATORS)


@dataclass
class Unit:
    """The widgets of one control unit."""

    index: int
    enabled: gr.Checkbox
    controlnet: gr.Dropdown
    control_type: gr.Dropdown
    source: gr.Radio
    image: gr.Image
    sketch: gr.Sketchpad
    upload_box: gr.Group
    draw_box: gr.Group
    annotator: gr.Dropdown
    groups: dict[str, gr.Group]
    params: dict[str, dict[str, gr.components.Component]]  # annotator -> param -> widget
    preview: gr.Image
    preview_button: gr.Button
    strength: gr.Slider
    start: gr.Slider
    end: gr.Slider
    mode: gr.Radio
    guess_mode: gr.Checkbox
    region: gr.Image

    @property
    def widgets(self) -> list[gr.components.Component]:
        """Every input widget of the unit."""
        return [
            self.enabled,
            self.controlnet,
            self.control_type,
            self.source,
            self.image,
            self.sketch,
            self.annotator,
            self.strength,
            self.start,
            self.end,
            self.mode,
            self.guess_mode,
            self.region,
            *[w for ws in self.params.values() for w in ws.values()],
        ]

    def request(self, service: Service, data: dict) -> ControlRequest:
        """The unit as a control request: its image and region mask checked and stored, its
        ControlNet's file, its annotator (none: a ready map) with its parameters, and its settings
        read as the schema declares them."""
        name = data[self.annotator]
        settings = {
            field: field_value(ControlRequest, field, data[getattr(self, field)]) for field in _SETTINGS
        }
        kind = data[self.control_type]
        return ControlRequest(
            image=_unit_image(service, self, data),
            controlnet=service.controlnet_path(data[self.controlnet]),
            control_type=None if kind in (None, NONE) else kind,
            preprocess=None if name == NONE else name,
            params={} if name == NONE else self.annotator_params(data, name),
            region_mask=_unit_region(service, self, data),
            **settings,
        )

    def annotator_params(self, data: dict, name: str) -> dict[str, Any]:
        # (an empty choice of weights is left out: the server then names what it offers)
        return {
            k: _param_value(ANNOTATORS[name].param(k), data[w])
            for k, w in self.params.get(name, {}).items()
            if data[w] is not None
        }


def _param_value(p: Param, value: Any) -> Any:
    if p.type is ParamType.INT and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _SPEC(name: str) -> Any:
    return params(ControlRequest)[name][1]


def _field(name: str, prefix: str, **kw: Any) -> gr.components.Component:
    """The widget of control field ``name``, its element id prefixed with the unit's."""
    return field_widget(ControlRequest, name, elem_id=f"{prefix}-{name.replace('_', '-')}", **kw)


def _mask_like(service: Service, mask: str, image: str) -> str:
    """The painted mask at the size of the unit's image, as a generation fits both to its output."""
    from PIL import Image

    from ..annotators.utils import resize_to
    from ..imageio import read_mask

    with Image.open(image) as img:
        size = (img.height, img.width)
    m = read_mask(mask)
    if m.shape[:2] == size:
        return mask
    resized = resize_to((m > 0.5).astype(np.uint8) * 255, size, nearest=True)
    return service.store_image(resized, "mask", mask=True)


def _weights_widget(service: Service, p: Param, elem_id: str) -> gr.Dropdown:
    """The choice among the weights this server offers (by name; no path is typed)."""
    offered = list(service.annotator_weights)
    return gr.Dropdown(
        choices=offered,
        value=p.default if p.default in offered else (offered[0] if offered else None),
        label=p.name,
        info=p.help.split(":")[0] + " (the weights this server offers)",
        elem_id=elem_id,
    )


def control_types(service: Service, controlnet: str | None) -> list[str]:
    """The control types the ControlNet called ``controlnet`` knows: a Union ControlNet's modes
    (their names, or numbers where the model's modes have none), or 'none' for a ControlNet of one
    kind."""
    return service.control_types.get(controlnet or "") or [NONE]


def unit(service: Service, i: int, default_annotator: str) -> Unit:
    names = control_annotators()
    pre = f"control-{i}"
    with gr.Tab(f"Control {i + 1}", id=pre, elem_id=f"{pre}-tab"):
        with gr.Row():
            enabled = gr.Checkbox(value=i == 0, label="Enabled", elem_id=f"{pre}-enabled")
            controlnet = gr.Dropdown(
                list(service.controlnets),
                value=next(iter(service.controlnets)),
                label="ControlNet",
                elem_id=f"{pre}-controlnet",
            )
            kinds = control_types(service, next(iter(service.controlnets)))
            control_type = gr.Dropdown(
                kinds,
                value=kinds[0],
                label="Control type",
                info="a Union ControlNet's kind of condition",
                elem_id=f"{pre}-control-type",
            )
            source = gr.Radio(["upload", "draw"], value="upload", label="Image", elem_id=f"{pre}-source")
        with gr.Row():
            with gr.Column():
                # visibility is switched on these boxes, never on the widgets: a widget that gets an
                # update is replaced in the session by a plain copy (see checked_upload)
                with gr.Group() as upload_box:
                    image = upload("Image or condition map", f"{pre}-image", f"control {i + 1} image")
                with gr.Group(visible=False) as draw_box:
                    sketch = gr.Sketchpad(
                        type="numpy",
                        image_mode="RGB",
                        canvas_size=(512, 512),
                        label="Draw black on white (annotator: scribble)",
                        elem_id=f"{pre}-sketch",
                    )
            preview = gr.Image(
                label="Condition map (preview)",
                interactive=False,
                format="png",
                elem_id=f"{pre}-preview",
            )
        with gr.Row():
            annotator = gr.Dropdown(
                [NONE, *names],
                value=default_annotator,
                label="Annotator",
                info="'none': the image already is a condition map",
                elem_id=f"{pre}-annotator",
            )
            preview_button = gr.Button("Preview", elem_id=f"{pre}-preview-button")
        groups, params = {}, {}
        for name in names:
            a: Annotator = ANNOTATORS[name]
            if not a.params:
                continue
            with gr.Group(visible=name == default_annotator) as group:
                params[name] = {
                    p.name: _weights_widget(service, p, f"{pre}-{name}-{p.name}")
                    if a.needs_weights and p.name == "weights"
                    else param_widget(p, f"{pre}-{name}-{p.name}")
                    for p in a.params
                }
            groups[name] = group
        with gr.Row():  # the page offers up to 2, the released apps' range (the API takes up to 10)
            strength = _field("strength", pre, maximum=2.0, step=0.05)
            start = _field("start", pre, step=0.01)
            end = _field("end", pre, step=0.01)
        with gr.Row():
            mode = _field("mode", pre)
            guess_mode = _field("guess_mode", pre)
        with gr.Accordion("Region mask", open=False):
            region = upload(_SPEC("region_mask").help, f"{pre}-region", f"control {i + 1} region mask")
    return Unit(
        index=i,
        enabled=enabled,
        controlnet=controlnet,
        control_type=control_type,
        source=source,
        image=image,
        sketch=sketch,
        upload_box=upload_box,
        draw_box=draw_box,
        annotator=annotator,
        groups=groups,
        params=params,
        preview=preview,
        preview_button=preview_button,
        strength=strength,
        start=start,
        end=end,
        mode=mode,
        guess_mode=guess_mode,
        region=region,
    )


def _unit_region(service: Service, unit: Unit, data: dict) -> str | None:
    """The unit's region mask, checked and stored as a mask; None when there is none."""
    upload = data[unit.region]
    if isinstance(upload, Unreadable):
        raise ValueError(upload.message)
    return service.store_image(upload, f"control {unit.index + 1} region mask", mask=True) if upload else None


def _unit_image(service: Service, unit: Unit, data: dict) -> str:
    """The unit's image, checked and stored; ValueError when there is none."""
    what = f"control {unit.index + 1} image"
    if data[unit.source] == "draw":
        drawing = data[unit.sketch]
        composite = drawing.get("composite") if isinstance(drawing, dict) else None
        if composite is None or (composite.min() == composite.max()):
            raise ValueError(f"control {unit.index + 1}: draw something on the canvas first")
        return service.store_image(composite, what)
    upload = data[unit.image]
    if isinstance(upload, Unreadable):
        raise ValueError(upload.message)
    if not upload:
        raise ValueError(f"control {unit.index + 1}: upload an image first")
    return service.store_image(upload, what)


def wire_unit(service: Service, u: Unit, resolution: gr.Slider, editor: gr.ImageEditor) -> None:
    """The unit's events: source switch, annotator switch, and the live preview."""

    def switch_source(source: str) -> tuple[Any, Any, Any]:
        draw = source == "draw"
        return (
            gr.update(visible=not draw),
            gr.update(visible=draw),
            gr.update(value="scribble") if draw else gr.update(),
        )

    u.source.change(
        switch_source, u.source, [u.upload_box, u.draw_box, u.annotator], api_visibility="private"
    )

    def switch_controlnet(name: str) -> Any:
        kinds = control_types(service, name)
        return gr.update(choices=kinds, value=kinds[0])

    u.controlnet.change(switch_controlnet, u.controlnet, u.control_type, api_visibility="private")

    names = list(u.groups)

    def switch_annotator(name: str) -> list[Any]:
        return [gr.update(visible=n == name) for n in names]

    u.annotator.change(switch_annotator, u.annotator, [u.groups[n] for n in names], api_visibility="private")

    def preview(data: dict) -> Any:
        name = data[u.annotator]
        try:
            image = _unit_image(service, u, data)
            res = int(data[resolution])
            if name == NONE:  # a ready map: shown at the size the model gets it, alpha kept
                from ..annotators import resize_for_model
                from ..imageio import read_image

                return resize_for_model(read_image(image, alpha=True), res)
            mask = None
            if "mask" in ANNOTATORS[name].inputs:
                _, mask = editor_images(service, data[editor])
                if mask is None:
                    raise ValueError(
                        f"control {u.index + 1}: {name} reads the mask: paint the region to "
                        "regenerate under 'Image to image and masked editing' first"
                    )
                mask = _mask_like(service, mask, image)
            return service.preprocess(
                name, image, u.annotator_params(data, name), mask=mask, resolution=res, detect_resolution=res
            )
        except Exception as e:
            raise user_error(e) from None

    inputs = {
        u.source,
        u.image,
        u.sketch,
        u.annotator,
        resolution,
        editor,
        *(w for ws in u.params.values() for w in ws.values()),
    }
    kw = {
        "concurrency_id": "preview",
        "concurrency_limit": 2,
        "trigger_mode": "always_last",
        "api_visibility": "private",
    }
    u.preview_button.click(preview, inputs, u.preview, **kw)
    u.image.upload(preview, inputs, u.preview, **kw)
    u.annotator.input(preview, inputs, u.preview, **kw)
    for ws in u.params.values():
        for w in ws.values():
            param_events(w)(preview, inputs, u.preview, **kw)
