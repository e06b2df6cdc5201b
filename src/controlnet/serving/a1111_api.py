"""The A1111 web UI's HTTP API and its ControlNet extension's, served beside ours: the routes
clients of the web UI call (txt2img, img2img, progress, interrupt, the model, sampler, module
lists, the annotators), answered from the models this server has loaded, through the same queue
and limits as our own API (:mod:`controlnet.serving.a1111` reads the payloads).

Errors are ``{"error": ..., "detail": ...}`` naming the web UI's field: 400 for a value not
served or out of bounds, 404 for an unknown route, 413 over an upload limit, 422 for a body that
is not an object of the right shape, 503 when the queue is full; never a 500 for bad input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .. import __version__
from ..imageio import read_image
from . import a1111
from . import a1111_names as names
from .api import GenerateBody, build_request, output_json, read_object, request_body_limit, validation_message
from .api import answer as api_answer
from .codec import decode_image, encode_png
from .service import Service

__all__ = ["add_routes"]

log = logging.getLogger(__name__)

#: the ControlNet extension's API version that these routes follow
EXTENSION_API_VERSION = 3


def _model_name(service: Service) -> str:
    """The served base model as clients know it: its file or folder name (no server path)."""
    return Path(service.base).name


def add_routes(api: FastAPI, service: Service) -> None:
    """Add the web UI's routes for ``service`` to ``api`` (our API's app)."""
    limit = request_body_limit(service)

    async def answer(work: Any) -> JSONResponse:  # errors also under "detail", as the web UI's
        return await api_answer(work, detail=True)

    async def read_json(request: Request) -> dict[str, Any]:
        return await read_object(request, limit)

    options: dict[str, Any] = {
        "sd_model_checkpoint": _model_name(service),
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "live_previews_enable": True,
        "control_net_unit_count": service.limits.max_controls,
    }

    def server() -> a1111.Server:
        return a1111.Server(
            controlnets=list(service.controlnets),
            modules=names.served_modules(service.annotator_weights),
            model_name=_model_name(service),
            options=dict(options),
            detect=detect,
            read=read,
            decode=decode_image,
        )

    def read(data: bytes, what: str) -> np.ndarray:
        return read_image(service.store_image(data, what))

    def detect(
        annotator: str, image: bytes, params: dict[str, Any], mask: bytes | None, res: int | None, where: str
    ) -> np.ndarray:
        stored = service.store_image(image, f"{where}.image")
        masked = None if mask is None else service.store_image(mask, f"{where}.mask", mask=True)
        return service.preprocess(annotator, stored, params, mask=masked, detect_resolution=res)

    async def generate(request: Request, img2img: bool) -> dict[str, Any]:
        payload = await read_json(request)
        t = await run_in_threadpool(a1111.translate, payload, server(), img2img=img2img)
        if t.ignored:
            log.info(
                "%s: ignored fields the web UI does not know: %s", request.url.path, ", ".join(t.ignored)
            )
        try:
            body = GenerateBody.model_validate(t.body)
        except ValidationError as e:  # a value of the payload of the wrong kind
            raise ValueError(validation_message(e)) from None
        req = await run_in_threadpool(build_request, service, body)
        job = await run_in_threadpool(service.submit, req)
        out = await asyncio.wrap_future(job.future)
        ours = await run_in_threadpool(output_json, out)
        detected = [ours["conditions"][i] for i in t.detected]
        return a1111.answer(payload, t.body, ours, _model_name(service), detected)

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        return await answer(generate(request, img2img=False))

    @api.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        return await answer(generate(request, img2img=True))

    # ------------------------------------------------------------------ progress and control
    @api.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> JSONResponse:
        async def work() -> dict[str, Any]:
            job = service.current()
            health = service.health()["queue"]
            state: dict[str, Any] = {
                "skipped": False,
                "interrupted": False,
                "stopping_generation": False,
                "job": "",
                "job_count": health["waiting"] + health["running"],
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            }
            if job is None:
                return {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "state": state,
                    "current_image": None,
                    "textinfo": None,
                }
            watch = job.watch
            if not skip_current_image:
                watch.ask_preview()
            state.update(
                job=job.id,
                interrupted=watch.stopping,
                sampling_step=watch.step,
                sampling_steps=watch.total,
                job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.submitted)),
            )
            shown = None if skip_current_image else watch.preview()
            image = None if shown is None else await run_in_threadpool(encode_png, shown[1][0])
            return {
                "progress": round(watch.step / watch.total, 4) if watch.total else 0.0,
                "eta_relative": round(watch.eta() or 0.0, 2),
                "state": state,
                "current_image": image,
                "textinfo": None,
                "current_task": job.id,
            }

        return await answer(work())

    @api.post("/sdapi/v1/interrupt")
    async def interrupt() -> JSONResponse:
        service.interrupt()
        return JSONResponse({})

    @api.post("/sdapi/v1/skip")
    async def skip() -> JSONResponse:
        service.interrupt()  # one batch per job here: skipping it is stopping it
        return JSONResponse({})

    # ------------------------------------------------------------------ what a client reads first
    @api.get("/sdapi/v1/sd-models")
    async def sd_models() -> JSONResponse:
        name = _model_name(service)
        stem = name.removesuffix(".safetensors")
        entry = {
            "title": name,
            "model_name": stem,
            "hash": None,
            "sha256": None,
            "filename": name,
            "config": None,
        }
        return JSONResponse([entry])

    @api.get("/sdapi/v1/samplers")
    async def samplers() -> JSONResponse:
        return JSONResponse(
            [
                {"name": name, "aliases": [ours.value], "options": {"scheduler": schedule}}
                for name, (ours, schedule) in names.SAMPLERS.items()
            ]
        )

    @api.get("/sdapi/v1/schedulers")
    async def schedulers() -> JSONResponse:
        return JSONResponse(
            [
                {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in names.SCHEDULES.items()
            ]
        )

    @api.get("/sdapi/v1/scripts")
    async def scripts() -> JSONResponse:
        # "controlnet m2m" is how client libraries tell that the extension is there (and then
        # send empty units rather than none, which a web UI would read as "the last ones"); the
        # script itself (script_name) is not served
        names = ["controlnet", "controlnet m2m"]
        return JSONResponse({"txt2img": names, "img2img": names})

    @api.get("/sdapi/v1/options")
    async def get_options() -> JSONResponse:
        return JSONResponse(options)

    @api.post("/sdapi/v1/options")
    async def set_options(request: Request) -> JSONResponse:
        async def work() -> None:
            given = await read_json(request)
            checkpoint = given.get("sd_model_checkpoint")
            if checkpoint is not None and str(checkpoint).split(" [")[0] != _model_name(service):
                raise ValueError(
                    f"sd_model_checkpoint: {checkpoint!r} is not served; this server has "
                    f"{_model_name(service)!r}"
                )
            clip_skip = given.get("CLIP_stop_at_last_layers")
            if clip_skip is not None and (
                isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12
            ):
                raise ValueError(f"CLIP_stop_at_last_layers: expected a whole number 1-12, got {clip_skip!r}")
            unused = sorted(set(given) - {"sd_model_checkpoint", "CLIP_stop_at_last_layers"})
            if unused:
                log.info("options this server keeps but does not use: %s", ", ".join(unused))
            options.update(given)
            return None

        return await answer(work())

    # ------------------------------------------------------------------ the ControlNet extension
    @api.get("/controlnet/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": EXTENSION_API_VERSION, "server": f"controlnet {__version__}"})

    @api.get("/controlnet/model_list")
    async def model_list() -> JSONResponse:
        return JSONResponse({"model_list": list(service.controlnets)})

    @api.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False) -> JSONResponse:
        served = names.served_modules(service.annotator_weights)
        detail = {}
        for name in served:
            m = names.MODULES[name]
            sliders = [
                {"name": slider[0], "value": slider[1], "min": slider[2], "max": slider[3]}
                for slider in (m.a, m.b)
                if slider is not None
            ]
            detail[name] = {"model_free": name == "none", "sliders": sliders, "annotator": m.annotator}
        return JSONResponse({"module_list": served, "module_detail": detail})

    @api.get("/controlnet/settings")
    async def settings() -> JSONResponse:
        return JSONResponse({"control_net_unit_count": service.limits.max_controls})

    @api.post("/controlnet/detect")
    async def detect_route(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            given = await read_json(request)
            images = given.get("controlnet_input_images", given.get("controlnet_images")) or []
            masks = given.get("controlnet_masks") or []
            if not isinstance(images, list) or not images:
                raise ValueError("controlnet_input_images: no image given (a list of base64 images)")
            if len(images) > service.limits.max_samples:
                raise ValueError(
                    f"controlnet_input_images: {len(images)} images is over this server's limit of "
                    f"{service.limits.max_samples}"
                )
            served = names.served_modules(service.annotator_weights)
            _, module = names.module_of(given.get("controlnet_module", "none"), "controlnet_module", served)
            a, b = (names.number(given, f"controlnet_threshold_{k}", -1.0) for k in "ab")
            params = names.module_params(module, a, b)
            res = names.number(given, "controlnet_processor_res", -1, int)
            res = res if 64 <= res <= 2048 else 512
            out = []
            for i, text in enumerate(images):
                what = f"controlnet_input_images[{i}]"
                data = decode_image(text, what)
                if module.annotator is None:
                    out.append(encode_png(read(data, what)))
                    continue
                mask = decode_image(masks[i], f"controlnet_masks[{i}]") if i < len(masks) else None
                cond = await run_in_threadpool(detect, module.annotator, data, params, mask, res, what)
                out.append(encode_png(cond))
            return {"images": out, "info": "Success"}

        return await answer(work())
