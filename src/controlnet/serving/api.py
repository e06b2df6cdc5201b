"""The HTTP JSON API: generate and preprocess for programs, beside the web app on the same server.

Routes (all JSON; images are base64-encoded PNG, or any image format, plain or as a data URL):

- ``POST /api/generate``: a generation request (the fields of
  :class:`~controlnet.generation.generate.GenerationRequest` that a client may choose; controls name a
  ControlNet of the server). Returns the images, the condition maps, the seeds, the full prompt and
  the JSON sidecar of the run.
- ``POST /api/preprocess``: an annotator name, its parameters and an image -> the condition map.
- ``GET /api/annotators``: every annotator with its typed parameters.
- ``GET /api/health``: the server's state (queue, counts, models, limits).

Errors are ``{"error": "..."}`` naming the parameter: 400 for a bad value or a limit, 413 for an
upload or body over a size limit, 422 for a malformed request (missing field, wrong type, unknown
field), 503 when the queue is full. Bad input never gives a 500, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..generation.generate import ControlRequest, GenerationRequest
from .service import BusyError, Service, UploadTooLarge

__all__ = ["ControlBody", "GenerateBody", "PreprocessBody", "create_api", "decode_image", "encode_png"]

log = logging.getLogger(__name__)
_D = GenerationRequest()
_C = ControlRequest(image="")


class ControlBody(BaseModel):
    """One control unit. ``image``: base64 image; ``controlnet``: a name from ``/api/health``
    (null: the server's first ControlNet); ``preprocess``: an annotator, or null for a ready map."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image: str
    controlnet: str | None = None
    preprocess: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    strength: float = _C.strength
    start: float = _C.start
    end: float = _C.end
    mode: str = _C.mode
    guess_mode: bool = _C.guess_mode
    region_mask: str | None = _C.region_mask


class GenerateBody(BaseModel):
    """A generation request. Images (``init_image``, ``mask``, each control's ``image``) are base64.
    ``seed``: null or -1 draws one (returned)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = _D.prompt
    controls: list[ControlBody] = Field(default_factory=list)
    prompt_setting: str = _D.prompt_setting
    added_prompt: str = _D.added_prompt
    negative_prompt: str = _D.negative_prompt
    prompt_syntax: str = _D.prompt_syntax
    clip_skip: int = _D.clip_skip
    sampler: str = _D.sampler
    timestep_spacing: str = _D.timestep_spacing
    eta: float = _D.eta
    steps: int = _D.steps
    guidance: float = _D.guidance
    seed: int | None = _D.seed
    num_samples: int = _D.num_samples
    resolution: int | None = _D.resolution
    width: int | None = _D.width
    height: int | None = _D.height
    resize_mode: str = _D.resize_mode
    init_image: str | None = _D.init_image
    denoise: float = _D.denoise
    mask: str | None = _D.mask
    mask_blur: int = _D.mask_blur
    overlay: bool = _D.overlay
    hires_scale: float = _D.hires_scale
    hires_denoise: float = _D.hires_denoise
    hires_steps: int | None = _D.hires_steps
    hires_upscaler: str = _D.hires_upscaler
    vae_tiling: bool = _D.vae_tiling


#: GenerationRequest fields the server sets itself; a client sending one gets a 422.
SERVER_FIELDS = frozenset(
    {f.name for f in dataclasses.fields(GenerationRequest)} - set(GenerateBody.model_fields)
)


class PreprocessBody(BaseModel):
    """An annotator run: ``image`` (base64), ``params`` by name, an optional ``mask`` (inpaint), and
    optional ``resolution`` (short side of the map, for the model) / ``detect_resolution``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    annotator: str
    image: str
    params: dict[str, Any] = Field(default_factory=dict)
    mask: str | None = None
    resolution: int | None = None
    detect_resolution: int | None = None


# ---------------------------------------------------------------------------- images
def decode_image(data: str, what: str) -> bytes:
    """The bytes of a base64 image, plain or as a ``data:...;base64,`` URL."""
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"{what}: expected a base64-encoded image, got an empty value")
    text = data.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{what}: a data URL must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None


def encode_png(image: np.ndarray) -> str:
    """An (H, W[, C]) uint8 array -> base64 PNG text (RGBA stays RGBA)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _file_b64(path: Any) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


# ---------------------------------------------------------------------------- building requests
def build_request(service: Service, body: GenerateBody) -> GenerationRequest:
    """Store the body's images and make the :class:`GenerationRequest` (not yet checked)."""

    def stored(value: str | None, what: str, *, mask: bool = False) -> Any:
        """The upload ``value`` (base64) decoded, checked and stored: its path; None for None."""
        return None if value is None else service.store_image(decode_image(value, what), what, mask=mask)

    controls = [
        ControlRequest(
            **c.model_dump(exclude={"image", "controlnet", "region_mask"}),
            image=stored(c.image, f"controls[{i}].image"),
            controlnet=service.controlnet_path(c.controlnet),
            region_mask=stored(c.region_mask, f"controls[{i}].region_mask", mask=True),
        )
        for i, c in enumerate(body.controls)
    ]
    fields = body.model_dump(exclude={"controls", "init_image", "mask"})
    for name in fields.keys() - body.model_fields_set:  # not sent: the default for the served model
        fields[name] = getattr(service.defaults, name)
    if fields["seed"] == -1:
        fields["seed"] = None
    images = {name: stored(getattr(body, name), name, mask=name == "mask") for name in ("init_image", "mask")}
    return GenerationRequest(controls=controls, **fields, **images)


# ---------------------------------------------------------------------------- the app
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            extra = " (set by the server)" if err["loc"] and err["loc"][-1] in SERVER_FIELDS else ""
            msg = f"unknown field{extra}"
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts)


async def _read_body(request: Request, limit: int, model: type[BaseModel]) -> Any:
    """The JSON body parsed into ``model``; raises _HTTPError (413 over ``limit`` bytes, 400 not
    JSON, 422 the wrong shape)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, f"the request body is over the limit of {limit / 1e6:g} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, f"the request body is over the limit of {limit / 1e6:g} MB")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _HTTPError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise _HTTPError(422, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _HTTPError(422, _validation_message(e)) from None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status(e: BaseException) -> int:
    if isinstance(e, _HTTPError):
        return e.status
    if isinstance(e, UploadTooLarge):
        return 413
    if isinstance(e, BusyError):
        return 503
    if isinstance(e, (ValueError, FileNotFoundError)):
        return 400
    return 500


def create_api(service: Service) -> FastAPI:
    """A FastAPI app serving the routes above for ``service`` (the web app is mounted beside it)."""
    # no generated docs pages: they load their scripts from a CDN, and docs/app.md is the reference
    api = FastAPI(title="controlnet", docs_url=None, redoc_url=None, openapi_url=None)
    lim = service.limits
    # every image of a request at the upload limit, base64-encoded, plus room for the rest
    body_limit = int((lim.max_controls + 2) * lim.max_upload_mb * 1e6 * 4 / 3) + 1_000_000

    async def answer(work: Any) -> JSONResponse:
        try:
            return JSONResponse(await work)
        except Exception as e:
            status = _status(e)
            if status == 500:
                log.exception("request failed")
                return _error(500, f"internal error: {type(e).__name__}: {e}")
            return _error(status, str(e))

    @api.get("/api/health")
    async def health() -> JSONResponse:
        return JSONResponse(service.health())

    @api.get("/api/annotators")
    async def annotators() -> JSONResponse:
        from ..annotators import ANNOTATORS

        return JSONResponse([_describe(a) for a in sorted(ANNOTATORS.values(), key=lambda a: a.name)])

    @api.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            body = await _read_body(request, body_limit, GenerateBody)
            req = await run_in_threadpool(build_request, service, body)
            job = await run_in_threadpool(service.submit, req)  # checks, then queues
            out = await asyncio.wrap_future(job.future)
            return await run_in_threadpool(
                lambda: {
                    "images": [_file_b64(p) for p in out.images],
                    "conditions": [encode_png(c) for c in out.conditions],
                    "seeds": out.seeds,
                    "prompt": out.prompt,
                    "seconds": round(out.seconds, 3),
                    "sidecar": out.record,
                }
            )

        return await answer(work())

    @api.post("/api/preprocess")
    async def preprocess(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            body = await _read_body(request, body_limit, PreprocessBody)

            def run() -> dict[str, Any]:
                image = service.store_image(decode_image(body.image, "image"), "image")
                mask = None
                if body.mask is not None:
                    mask = service.store_image(decode_image(body.mask, "mask"), "mask", mask=True)
                cond = service.preprocess(
                    body.annotator,
                    image,
                    body.params,
                    mask=mask,
                    resolution=body.resolution,
                    detect_resolution=body.detect_resolution,
                )
                return {
                    "annotator": body.annotator,
                    "image": encode_png(cond),
                    "width": int(cond.shape[1]),
                    "height": int(cond.shape[0]),
                }

            return await run_in_threadpool(run)

        return await answer(work())

    return api


def _describe(a: Any) -> dict[str, Any]:
    return {
        "name": a.name,
        "description": a.description,
        "needs_weights": a.needs_weights,
        "inputs": list(a.inputs),
        "model_invert": a.model_invert,
        "params": [
            {
                "name": p.name,
                "type": p.type.value,
                "default": p.default,
                "help": p.help,
                "minimum": p.minimum,
                "maximum": p.maximum,
                "choices": list(p.choices),
            }
            for p in a.params
        ],
    }
