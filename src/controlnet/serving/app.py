"""The web app: one Gradio page for every condition, up to three control units, img2img and masks.

A thin shell: widgets in, a :class:`~controlnet.generation.generate.GenerationRequest` out, handed to the
:class:`~controlnet.serving.service.Service` that the HTTP API uses too (same limits, same single worker).
The annotator parameter widgets are made from the registry's typed :class:`Param` records, so a new
annotator appears here without a change to this file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from ..annotators import ANNOTATORS, Annotator, Param, ParamType, hwc3
from ..choices import (
    ControlMode,
    HiresUpscaler,
    PromptSetting,
    PromptSyntax,
    ResizeMode,
    Sampler,
    TimestepSpacing,
)
from ..generation.generate import MAX_HIRES_SCALE, ControlRequest, GenerationRequest, resolve_prompt
from ..text.prompts import CHUNK_TOKENS, token_count
from .service import BusyError, Service

__all__ = ["build_ui", "checked_upload", "control_annotators", "param_widget"]

log = logging.getLogger(__name__)
NONE = "none"  # the annotator choice for an image that already is a condition map
_SLIDER_SPAN = 1000  # wider numeric ranges get a number box instead of a slider


def control_annotators() -> list[str]:
    """Annotators a control unit offers: every one. One that takes a mask (inpaint) reads the mask
    painted in the masked-editing panel."""
    return sorted(ANNOTATORS)


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


def _param_events(widget: gr.components.Component) -> Any:
    """The event a parameter widget fires when the user has settled on a value."""
    if isinstance(widget, gr.Slider):
        return widget.release
    if isinstance(widget, gr.Textbox):
        return widget.submit
    return widget.input


@dataclass
class Unit:
    """The widgets of one control unit."""

    index: int
    enabled: gr.Checkbox
    controlnet: gr.Dropdown
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

    def annotator_params(self, data: dict, name: str) -> dict[str, Any]:
        return {
            k: _param_value(ANNOTATORS[name].param(k), data[w]) for k, w in self.params.get(name, {}).items()
        }


def _param_value(p: Param, value: Any) -> Any:
    if p.type is ParamType.INT and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _upload(label: str, elem_id: str, what: str) -> gr.Image:
    """An image upload (a file path for the handlers), checked as :func:`checked_upload` says."""
    image = gr.Image(
        type="filepath", image_mode=None, sources=["upload", "clipboard"], label=label, elem_id=elem_id
    )
    return checked_upload(image, what)


def _unit(service: Service, i: int, default_annotator: str) -> Unit:
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
            source = gr.Radio(["upload", "draw"], value="upload", label="Image", elem_id=f"{pre}-source")
        with gr.Row():
            with gr.Column():
                # visibility is switched on these boxes, never on the widgets: a widget that gets an
                # update is replaced in the session by a plain copy (see checked_upload)
                with gr.Group() as upload_box:
                    image = _upload("Image or condition map", f"{pre}-image", f"control {i + 1} image")
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
                params[name] = {p.name: param_widget(p, f"{pre}-{name}-{p.name}") for p in a.params}
            groups[name] = group
        with gr.Row():
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength", elem_id=f"{pre}-strength")
            start = gr.Slider(0, 1, value=0.0, step=0.01, label="Start (fraction of steps)")
            end = gr.Slider(0, 1, value=1.0, step=0.01, label="End (fraction of steps)")
        with gr.Row():
            mode = gr.Radio(
                [m.value for m in ControlMode],
                value=ControlMode.BALANCED.value,
                label="Control mode",
                info="balanced, my prompt is more important, ControlNet is more important",
            )
            guess_mode = gr.Checkbox(value=False, label="Guess mode (no prompt needed)")
        with gr.Accordion("Region mask", open=False):
            label = "Where this control acts: white (or opaque) pixels; none: everywhere"
            region = _upload(label, f"{pre}-region", f"control {i + 1} region mask")
    return Unit(
        index=i,
        enabled=enabled,
        controlnet=controlnet,
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


# ---------------------------------------------------------------------------- handlers
def _user_error(e: BaseException) -> gr.Error:
    if isinstance(e, (ValueError, FileNotFoundError, BusyError)):
        return gr.Error(str(e))
    log.exception("web app request failed")
    return gr.Error(f"internal error: {type(e).__name__}: {e}")


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


def _editor_images(service: Service, value: Any) -> tuple[str | None, str | None]:
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


def build_ui(service: Service) -> gr.Blocks:
    """The Gradio Blocks of the web app for ``service`` (queue it and mount it beside the API)."""
    lim, d = service.limits, service.defaults
    max_side = max(64, min(4096, int(math.sqrt(lim.max_megapixels * 1e6)) // 64 * 64))
    with gr.Blocks(title="ControlNet", analytics_enabled=False, delete_cache=(3600, 3600)) as ui:
        gr.Markdown(
            "## ControlNet\nUpload an image (or draw), pick an annotator to make the condition map, "
            "and generate. Programs can use the same server's HTTP JSON API under `/api`."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                tokens = gr.Markdown(elem_id="prompt-tokens")
                with gr.Tabs():
                    units = [_unit(service, i, "canny") for i in range(lim.max_controls)]
                with gr.Accordion("Image to image and masked editing", open=False):
                    editor = gr.ImageEditor(
                        type="numpy",
                        image_mode="RGBA",
                        sources=["upload", "clipboard"],
                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                        layers=False,
                        transforms=(),
                        label="Init image: paint the region to regenerate (no paint: the whole image)",
                        elem_id="init-image",
                    )
                    with gr.Row():
                        denoise = gr.Slider(
                            0.01, 1, value=0.75, step=0.01, label="Denoise (img2img strength)"
                        )
                        mask_blur = gr.Slider(0, 64, value=d.mask_blur, step=1, label="Mask feather (px)")
                        overlay = gr.Checkbox(value=d.overlay, label="Paste kept pixels back")
                with gr.Accordion("Hires fix", open=False), gr.Row():
                    hires_scale = gr.Slider(
                        1,
                        MAX_HIRES_SCALE,
                        value=d.hires_scale,
                        step=0.25,
                        label="Upscale by (1: off)",
                        info="a second, img2img pass at this many times the size",
                        elem_id="hires-scale",
                    )
                    hires_denoise = gr.Slider(
                        0.01, 1, value=d.hires_denoise, step=0.01, label="Hires denoise"
                    )
                    hires_steps = gr.Slider(
                        0, lim.max_steps, value=0, step=1, label="Hires steps (0: as Steps)"
                    )
                    hires_upscaler = gr.Radio(
                        [u.value for u in HiresUpscaler], value=d.hires_upscaler, label="Upscaler"
                    )
                    vae_tiling = gr.Checkbox(
                        value=d.vae_tiling,
                        label="Tiled VAE",
                        info="images larger than the VAE's tile are encoded and decoded in tiles: "
                        "less memory; colours can shift and seams show",
                        elem_id="vae-tiling",
                    )
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        setting = gr.Radio(
                            [s.value for s in PromptSetting], value=d.prompt_setting, label="Prompt setting"
                        )
                        sampler = gr.Dropdown([s.value for s in Sampler], value=d.sampler, label="Sampler")
                        spacing = gr.Dropdown(
                            [s.value for s in TimestepSpacing],
                            value=d.timestep_spacing,
                            label="Timestep spacing",
                            info="trailing: SGM Uniform, for few-step models",
                        )
                    added = gr.Textbox(value=d.added_prompt, label="Added prompt")
                    negative = gr.Textbox(value=d.negative_prompt, label="Negative prompt")
                    syntax = gr.Radio(
                        [s.value for s in PromptSyntax],
                        value=d.prompt_syntax,
                        label="Prompt syntax",
                        info="weighted: (emphasis), [less], (words:1.5), BREAK, prompts past 75 tokens; "
                        "plain: the text as it is, cut after 75 tokens",
                        elem_id="prompt-syntax",
                    )
                    clip_skip = gr.Slider(
                        1,
                        12,
                        value=d.clip_skip,
                        step=1,
                        label="Clip skip",
                        info="the text encoder layer read, from the end (SD1.x models; 1: the last)",
                    )
                    with gr.Row():
                        steps = gr.Slider(
                            1,
                            lim.max_steps,
                            value=min(d.steps, lim.max_steps),
                            step=1,
                            label="Steps",
                            elem_id="steps",
                        )
                        guidance = gr.Slider(0, 30, value=d.guidance, step=0.1, label="Guidance scale")
                        eta = gr.Slider(0, 1, value=d.eta, step=0.01, label="DDIM eta")
                    with gr.Row():
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                        samples = gr.Slider(
                            1, lim.max_samples, value=1, step=1, label="Samples", elem_id="samples"
                        )
                        resolution = gr.Slider(
                            64,
                            max_side,
                            value=min(service.native_size, max_side),
                            step=64,
                            label="Resolution (short side)",
                            elem_id="resolution",
                        )
                        resize_mode = gr.Radio(
                            [m.value for m in ResizeMode],
                            value=d.resize_mode,
                            label="Images of another aspect",
                            info="stretch, crop the centre, or fill (pad) to the output's",
                            elem_id="resize-mode",
                        )
            with gr.Column(scale=2):
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id="gallery")
                files = gr.File(
                    label="Downloads: images, grid, JSON sidecar",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
                info = gr.Markdown(elem_id="info")

        globals_ = [prompt, editor, denoise, mask_blur, overlay, setting, sampler, spacing, added, negative]
        globals_ += [syntax, clip_skip]
        globals_ += [steps, guidance, eta, seed, samples, resolution, resize_mode]
        globals_ += [hires_scale, hires_denoise, hires_steps, hires_upscaler, vae_tiling]

        def generate(data: dict, progress: gr.Progress = gr.Progress()) -> tuple[Any, Any, str]:  # noqa: B008
            try:
                controls = []
                for u in units:
                    if not data[u.enabled]:
                        continue
                    name = data[u.annotator]
                    controls.append(
                        ControlRequest(
                            image=_unit_image(service, u, data),
                            controlnet=service.controlnet_path(data[u.controlnet]),
                            preprocess=None if name == NONE else name,
                            params={} if name == NONE else u.annotator_params(data, name),
                            strength=float(data[u.strength]),
                            start=float(data[u.start]),
                            end=float(data[u.end]),
                            mode=data[u.mode],
                            guess_mode=bool(data[u.guess_mode]),
                            region_mask=_unit_region(service, u, data),
                        )
                    )
                init, mask = _editor_images(service, data[editor])
                request = GenerationRequest(
                    prompt=data[prompt],
                    controls=controls,
                    prompt_setting=data[setting],
                    added_prompt=data[added],
                    negative_prompt=data[negative],
                    prompt_syntax=data[syntax],
                    clip_skip=int(data[clip_skip]),
                    sampler=data[sampler],
                    timestep_spacing=data[spacing],
                    eta=float(data[eta]),
                    steps=int(data[steps]),
                    guidance=float(data[guidance]),
                    seed=None if data[seed] is None or int(data[seed]) < 0 else int(data[seed]),
                    num_samples=int(data[samples]),
                    resolution=int(data[resolution]),
                    resize_mode=data[resize_mode],
                    init_image=init,
                    denoise=float(data[denoise]) if init else 1.0,
                    mask=mask,
                    mask_blur=int(data[mask_blur]),
                    overlay=bool(data[overlay]),
                    hires_scale=float(data[hires_scale]),
                    hires_denoise=float(data[hires_denoise]),
                    hires_steps=int(data[hires_steps]) or None,
                    hires_upscaler=data[hires_upscaler],
                    vae_tiling=bool(data[vae_tiling]),
                )

                def show(step: int, total: int) -> None:
                    if total:
                        progress((step, total), desc="denoising", unit="steps")
                    else:
                        progress(0, desc="waiting for the worker")

                show(0, 0)
                out = service.generate(request, show)
            except Exception as e:
                raise _user_error(e) from None
            captions = [(str(p), f"seed {s}") for p, s in zip(out.images, out.seeds)]
            seeds = ", ".join(map(str, out.seeds))
            text = (
                f"**{len(out.images)} image(s)** in {out.seconds:.1f} s; seeds {seeds}\n\n"
                f"Prompt: `{out.prompt}`\n\nSidecar: `{out.sidecar.name}`"
            )
            return captions, [*map(str, out.images), str(out.grid), str(out.sidecar)], text

        inputs = {*globals_, *(w for u in units for w in u.widgets)}
        run.click(
            generate,
            inputs=inputs,
            outputs=[gallery, files, info],
            concurrency_id="gpu",
            concurrency_limit=1,
            api_visibility="private",
        )

        count_inputs = [prompt, added, setting, syntax]
        for box in count_inputs:
            box.change(prompt_tokens, count_inputs, tokens, api_visibility="private")
        for u in units:
            _wire_unit(service, u, resolution, editor)
    return ui


def prompt_tokens(prompt: str, added: str, setting: str, syntax: str) -> str:
    """The line under the prompt box: how many tokens the text encoder will read, as the request
    would resolve the prompt (with the added prompt) under ``setting`` and ``syntax``."""
    if setting == PromptSetting.AUTO.value:
        return "prompt: a caption of the image, made when you generate"
    text = resolve_prompt(GenerationRequest(prompt=prompt, added_prompt=added, prompt_setting=setting))
    n, chunks = token_count(text, syntax)
    if syntax == PromptSyntax.PLAIN.value:
        cut = f"; the {n - CHUNK_TOKENS} past {CHUNK_TOKENS} are cut off" if n > CHUNK_TOKENS else ""
        return f"{n} / {CHUNK_TOKENS} tokens{cut}"
    return f"{n} tokens ({chunks} chunk{'s' if chunks > 1 else ''} of {CHUNK_TOKENS})"


def _wire_unit(service: Service, u: Unit, resolution: gr.Slider, editor: gr.ImageEditor) -> None:
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
                _, mask = _editor_images(service, data[editor])
                if mask is None:
                    raise ValueError(
                        f"control {u.index + 1}: {name} reads the mask: paint the region to "
                        "regenerate under 'Image to image and masked editing' first"
                    )
            return service.preprocess(
                name, image, u.annotator_params(data, name), mask=mask, resolution=res, detect_resolution=res
            )
        except Exception as e:
            raise _user_error(e) from None

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
            _param_events(w)(preview, inputs, u.preview, **kw)
