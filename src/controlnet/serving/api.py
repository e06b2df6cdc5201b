"""The HTTP JSON API: generate and preprocess for programs, beside the web app on the same server.

Routes (all JSON; images are base64-encoded PNG, or any image format, plain or as a data URL):

- ``POST /api/generate``: a generation request (the fields of
  :class:`~controlnet.generation.generate.GenerationRequest` that a client may choose; controls name a
  ControlNet of the server). Returns the images, the condition maps, the seeds, the full prompt and
  the JSON sidecar of the run.
- ``POST /api/jobs``: the same request, queued: answers at once (202) with the job's id.
  ``GET /api/jobs/{id}`` its state (queued, running, done, stopped, cancelled, failed), progress
  and ETA, the result once it has one, and with ``?preview=true`` a preview of the image being
  made; ``DELETE /api/jobs/{id}`` cancels it (a queued job is dropped, a running one stops after
  its step and keeps the images it has).
- ``POST /api/preprocess``: an annotator name, its parameters and an image -> the condition map.
- ``GET /api/annotators``: every annotator with its typed parameters (and, for those that need
  weights, the names of the weights this server offers: a client never names a path).
- ``GET /api/health``: the server's state (queue, counts, models, limits).

Errors are ``{"error": "..."}`` naming the parameter: 400 for a bad value or a limit, 404 for an
unknown job, 413 for an upload or body over a size limit, 422 for a malformed request (missing
field, wrong type, unknown field), 503 when the queue is full. Bad input never gives a 500, and
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..generation.request import ControlRequest, GenerationRequest
from ..schema import Kind, Owner, enum_of, field_names, params, part_type
from .codec import decode_image, encode_png
from .service import BusyError, Job, Output, Service, UnknownJob
from .uploads import UploadTooLarge

__all__ = [
    "ControlBody",
    "GenerateBody",
    "PreprocessBody",
    "answer",
    "create_api",
    "decode_image",
    "encode_png",
    "job_json",
    "output_json",
    "read_object",
    "request_body_limit",
    "validation_message",
]

log = logging.getLogger(__name__)


def _body(cls: type, name: str, doc: str, parts: dict[str, type[BaseModel]]) -> type[BaseModel]:
    """The API body of a request dataclass, from its schema: every field a client may set (the
    server sets the rest), images as base64 text, models by the names the server offers, choices
    by their values, defaults the dataclass's; nested parts (controls) as the bodies in
    ``parts``. Types are checked here (a wrong one: 422); values, bounds and limits by the one
    check of the request (400)."""
    fields: dict[str, Any] = {}
    for fname, (f, spec, tp) in params(cls).items():
        if spec.owner is Owner.SERVER:
            continue
        default = Field(default_factory=f.default_factory) if callable(f.default_factory) else f.default
        if default is dataclasses.MISSING:
            default = ...
        enum = enum_of(tp)
        if spec.kind is Kind.PARTS:
            tp, default = list[parts[fname]], Field(default_factory=list)
        elif enum is not None:
            tp, default = str, default.value
        elif spec.kind in (Kind.IMAGE, Kind.MASK, Kind.MODEL):
            tp = str if default is ... else str | None
        fields[fname] = (tp, default)
    config = ConfigDict(extra="forbid", allow_inf_nan=False)
    return create_model(name, __config__=config, __doc__=doc, __module__=__name__, **fields)


ControlBody = _body(
    ControlRequest,
    "ControlBody",
    "One control unit. ``image``: base64 image; ``controlnet``: a name from ``/api/health`` "
    "(null: the server's first ControlNet); ``preprocess``: an annotator, or null for a ready map.",
    {},
)
GenerateBody = _body(
    GenerationRequest,
    "GenerateBody",
    "A generation request. Images (``init_image``, ``mask``, each control's ``image`` and "
    "``region_mask``) are base64. ``seed``: null or -1 draws one (returned).",
    {"controls": ControlBody},
)

#: GenerationRequest fields the server sets itself; a client sending one gets a 422.
SERVER_FIELDS = frozenset(field_names(GenerationRequest, lambda spec: spec.owner is Owner.SERVER))


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


def _file_b64(path: Any) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


# ---------------------------------------------------------------------------- building requests
def build_request(service: Service, body: Any) -> GenerationRequest:
    """Store the body's images and make the :class:`GenerationRequest` (not yet checked): fields
    not sent take the served model's defaults; a seed of -1 draws one."""
    fields = _values(service, GenerationRequest, body, "")
    for name in fields.keys() - body.model_fields_set:  # not sent: the default for the served model
        fields[name] = getattr(service.defaults, name)
    if fields["seed"] == -1:
        fields["seed"] = None
    return GenerationRequest(**fields)


def _values(service: Service, cls: type, body: BaseModel, where: str) -> dict[str, Any]:
    """The fields of ``cls`` from an API body, as the schema says to read each: uploads decoded,
    checked and stored (their paths), ControlNets by name (their files), parts part by part."""
    values: dict[str, Any] = {}
    for name, (_, spec, tp) in params(cls).items():
        if name not in type(body).model_fields:
            continue
        value, what = getattr(body, name), f"{where}.{name}" if where else name
        if spec.kind in (Kind.IMAGE, Kind.MASK) and value is not None:
            value = service.store_image(decode_image(value, what), what, mask=spec.kind is Kind.MASK)
        elif spec.kind is Kind.MODEL:
            value = service.controlnet_path(value)
        elif spec.kind is Kind.PARTS:
            part = part_type(tp)
            value = [part(**_values(service, part, item, f"{name}[{i}]")) for i, item in enumerate(value)]
        values[name] = value
    return values


# ---------------------------------------------------------------------------- the app
def _error(status: int, message: str, *, detail: bool = False) -> JSONResponse:
    """An error answer; ``detail``: the message also under "detail", where clients of the A1111
    web UI's API read it."""
    return JSONResponse({"error": message, **({"detail": message} if detail else {})}, status_code=status)


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            extra = " (set by the server)" if err["loc"] and err["loc"][-1] in SERVER_FIELDS else ""
            msg = f"unknown field{extra}"
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts)


async def read_object(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object; raises _HTTPError (413 over ``limit`` bytes, 400 not JSON, 422
    not an object)."""
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
    return data


async def _read_body(request: Request, limit: int, model: type[BaseModel]) -> Any:
    """The JSON body parsed into ``model``; raises _HTTPError (413 over ``limit`` bytes, 400 not
    JSON, 422 the wrong shape)."""
    data = await read_object(request, limit)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _HTTPError(422, validation_message(e)) from None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status(e: BaseException) -> int:
    if isinstance(e, _HTTPError):
        return e.status
    if isinstance(e, UnknownJob):
        return 404
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
    body_limit = request_body_limit(service)

    async def queued(request: Request) -> Job:
        """Read, check and queue the generation a request's body asks for."""
        body = await _read_body(request, body_limit, GenerateBody)
        req = await run_in_threadpool(build_request, service, body)
        return await run_in_threadpool(service.submit, req)  # checks, then queues

    @api.get("/api/health")
    async def health() -> JSONResponse:
        return JSONResponse(service.health())

    @api.get("/api/annotators")
    async def annotators() -> JSONResponse:
        from ..annotators import ANNOTATORS

        offered = list(service.annotator_weights)
        ordered = sorted(ANNOTATORS.values(), key=lambda a: a.name)
        return JSONResponse([_describe(a, offered) for a in ordered])

    @api.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            job = await queued(request)
            out = await asyncio.wrap_future(job.future)
            return await run_in_threadpool(output_json, out)

        return await answer(work())

    @api.post("/api/jobs")
    async def submit(request: Request) -> JSONResponse:
        async def work() -> dict[str, Any]:
            job = await queued(request)
            return {"id": job.id, "state": job.state}

        response = await answer(work())
        if response.status_code == 200:
            response.status_code = 202
        return response

    @api.get("/api/jobs/{job_id}")
    async def poll(job_id: str, preview: bool = False) -> JSONResponse:
        async def work() -> dict[str, Any]:
            job = service.job(job_id)
            if preview:
                job.watch.ask_preview()
            return await run_in_threadpool(job_json, job, preview)

        return await answer(work())

    @api.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str) -> JSONResponse:
        async def work() -> dict[str, Any]:
            job = service.cancel(job_id)
            return {"id": job.id, "state": job.state}

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


def request_body_limit(service: Service) -> int:
    """The most bytes a request body may have: every image of a request at the upload limit,
    base64-encoded, plus room for the rest."""
    lim = service.limits
    return int((lim.max_controls + 2) * lim.max_upload_mb * 1e6 * 4 / 3) + 1_000_000


async def answer(work: Any, detail: bool = False) -> JSONResponse:
    """The JSON answer of a route's work, or its error (the status :func:`_status` gives it;
    ``detail``: see :func:`_error`); an unexpected error is logged and is the only 500."""
    try:
        return JSONResponse(await work)
    except Exception as e:
        status = _status(e)
        if status == 500:
            log.exception("request failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}", detail=detail)
        return _error(status, str(e), detail=detail)


def output_json(out: Output) -> dict[str, Any]:
    """A finished generation as the API answers it."""
    answer: dict[str, Any] = {
        "images": [_file_b64(p) for p in out.images],
        "conditions": [encode_png(c) for c in out.conditions],
        "seeds": out.seeds,
        "prompt": out.prompt,
        "seconds": round(out.seconds, 3),
        "sidecar": out.record,
    }
    if out.stopped_at is not None:
        answer["stopped"] = {"after_step": out.stopped_at[0], "of": out.stopped_at[1]}
    return answer


def job_json(job: Job, preview: bool = False) -> dict[str, Any]:
    """A job's state, progress and ETA; its result once it has one, its error if it failed; the
    latest preview (the first sample's) when asked."""
    state, watch = job.state, job.watch
    eta = watch.eta() if state == "running" else None
    answer: dict[str, Any] = {
        "id": job.id,
        "state": state,
        "step": watch.step,
        "total": watch.total,
        "progress": round(watch.step / watch.total, 4) if watch.total else 0.0,
        "eta_s": None if eta is None else round(eta, 2),
    }
    if state in ("done", "stopped"):
        answer["result"] = output_json(job.future.result())
    elif state == "failed":
        e = job.future.exception()
        answer["error"] = (
            str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}"
        )
    if preview:
        shown = watch.preview()
        answer["preview"] = None if shown is None else {"step": shown[0], "image": encode_png(shown[1][0])}
    return answer


def _describe(a: Any, offered: list[str]) -> dict[str, Any]:
    """An annotator for clients; one that needs weights lists the names this server offers."""
    return {
        "name": a.name,
        "description": a.description,
        "needs_weights": a.needs_weights,
        "weights": offered if a.needs_weights else [],
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
