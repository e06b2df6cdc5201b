"""The web app: one Gradio page for every condition, up to three control units, img2img and masks.

A thin shell: widgets in, a :class:`~controlnet.generation.request.GenerationRequest` out, handed to
the :class:`~controlnet.serving.service.Service` that the HTTP API uses too (same limits, same single
worker, the same one check). Every setting's widget is made from the request schema (its range,
default, label and help: :func:`~controlnet.serving.widgets.field_widget`) and read back by its
field's name; the page only says where each goes and narrows ranges to the server's limits. The
annotator parameter widgets are made from the registry's typed records, so a new annotator appears
here without a change to this file.
"""

from __future__ import annotations

import math
from concurrent.futures import CancelledError
from typing import Any

import gradio as gr

from ..annotators import annotator_for
from ..choices import MAX_SIDE, PromptSetting, PromptSyntax
from ..generation.generate import resolve_prompt
from ..generation.request import GenerationRequest
from ..text.prompts import CHUNK_TOKENS, token_count
from .service import Service
from .units import NONE, unit, wire_unit
from .widgets import editor_images, field_value, field_widget, user_error

__all__ = ["build_ui", "prompt_tokens"]


def build_ui(service: Service) -> gr.Blocks:
    """The Gradio Blocks of the web app for ``service`` (queue it and mount it beside the API)."""
    lim, d = service.limits, service.defaults
    max_side = max(64, min(MAX_SIDE, int(math.sqrt(lim.max_megapixels * 1e6)) // 64 * 64))
    fields: dict[str, gr.components.Component] = {}  # request field -> its widget

    def field(name: str, **kw: Any) -> gr.components.Component:
        """The widget of request field ``name``, showing the served model's default."""
        fields[name] = field_widget(GenerationRequest, name, **{"value": getattr(d, name), **kw})
        return fields[name]

    with gr.Blocks(title="ControlNet", analytics_enabled=False, delete_cache=(3600, 3600)) as ui:
        gr.Markdown(
            "## ControlNet\nUpload an image (or draw), pick an annotator to make the condition map, "
            "and generate. Programs can use the same server's HTTP JSON API under `/api`."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = field("prompt", lines=2)
                tokens = gr.Markdown(elem_id="prompt-tokens")
                with gr.Tabs():
                    # each unit starts with the annotator the first ControlNet's condition needs
                    first = annotator_for(next(iter(service.controlnets))) or NONE
                    units = [unit(service, i, first) for i in range(lim.max_controls)]
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
                        field("denoise", value=0.75, minimum=0.01, step=0.01)
                        field("mask_blur", maximum=64)
                        field("overlay")
                with gr.Accordion("Hires fix", open=False), gr.Row():
                    field("hires_scale", step=0.25)
                    field("hires_denoise", minimum=0.01, step=0.01)
                    field("hires_steps", value=0, minimum=0, maximum=lim.max_steps)
                    field("hires_upscaler")
                    field("vae_tiling")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        setting = field("prompt_setting")
                        field("sampler")
                        field("timestep_spacing")
                    added = field("added_prompt")
                    field("negative_prompt")
                    syntax = field("prompt_syntax")
                    field("clip_skip")
                    with gr.Row():
                        field("steps", value=min(d.steps, lim.max_steps), maximum=lim.max_steps)
                        field("guidance", maximum=30.0, step=0.1)  # the page's range; the API: to 100
                        field("eta", step=0.01)
                    with gr.Row():
                        field("seed", value=-1, minimum=-1, label="Seed (-1: random)")
                        field("num_samples", value=1, maximum=lim.max_samples)
                        resolution = field(
                            "resolution", value=min(service.native_size, max_side), maximum=max_side, step=64
                        )
                        field("resize_mode")
            with gr.Column(scale=2):
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                    stop = gr.Button("Interrupt", variant="stop", elem_id="interrupt", scale=1)
                session = gr.State({})  # this browser session's running job, for Interrupt
                gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id="gallery")
                files = gr.File(
                    label="Downloads: images, grid, JSON sidecar",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
                info = gr.Markdown(elem_id="info")

        def generate(data: dict, progress: gr.Progress = gr.Progress()) -> tuple[Any, Any, str]:  # noqa: B008
            mine = data[session]
            try:
                values = {name: field_value(GenerationRequest, name, data[w]) for name, w in fields.items()}
                init, mask = editor_images(service, data[editor])
                values.update(
                    init_image=init,
                    mask=mask,
                    denoise=values["denoise"] if init else 1.0,
                    seed=None if values["seed"] is None or values["seed"] < 0 else values["seed"],
                    hires_steps=values["hires_steps"] or None,  # 0: as many as the first pass
                )
                controls = [u.request(service, data) for u in units if data[u.enabled]]
                request = GenerationRequest(controls=controls, **values)

                def show(step: int, total: int) -> None:
                    if total:
                        progress((step, total), desc="denoising", unit="steps")
                    else:
                        progress(0, desc="waiting for the worker")

                show(0, 0)
                job = service.submit(request)
                mine["job"] = job.id
                out = service.wait(job, show)
            except CancelledError:
                raise user_error(ValueError("interrupted before it started")) from None
            except Exception as e:
                raise user_error(e) from None
            finally:
                mine.pop("job", None)
            captions = [(str(p), f"seed {s}") for p, s in zip(out.images, out.seeds)]
            seeds = ", ".join(map(str, out.seeds))
            stopped = ""
            if out.stopped_at is not None:
                stopped = f" (interrupted after step {out.stopped_at[0]} of {out.stopped_at[1]})"
            text = (
                f"**{len(out.images)} image(s)**{stopped} in {out.seconds:.1f} s; seeds {seeds}\n\n"
                f"Prompt: `{out.prompt}`\n\nSidecar: `{out.sidecar.name}`"
            )
            return captions, [*map(str, out.images), str(out.grid), str(out.sidecar)], text

        def interrupt(mine: dict) -> None:
            """Stop this session's job: dropped if queued, else it ends after its step with what it has."""
            if "job" in mine:
                service.cancel(mine["job"])

        stop.click(interrupt, inputs=[session], api_visibility="private")
        inputs = {*fields.values(), editor, session, *(w for u in units for w in u.widgets)}
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
            wire_unit(service, u, resolution, editor)
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
