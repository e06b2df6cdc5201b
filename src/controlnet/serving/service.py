"""The serving core that the web app and the HTTP API share: models, limits, uploads, one worker.

Both shells (:mod:`controlnet.serving.app`, :mod:`controlnet.serving.api`) turn what a user sent into a
:class:`~controlnet.generation.generate.GenerationRequest` and hand it to :class:`Service`. The service owns
everything that must be the same for both:

- the models, loaded once at start (a clear error when a file is missing or the ControlNets do not
  fit the base), and the server-side settings a client may not choose (device, dtype, files);
- the limits (:class:`Limits`), checked by one function, :meth:`Service.check`;
- uploads, checked like files (:func:`controlnet.imageio.read_image`: not an image, corrupt data,
  decompression bombs) plus the upload limits, and stored as normalised PNGs;
- one worker thread that runs generations (and learned annotators) one at a time, first come first
  served, so a GPU never holds two jobs; queued jobs wait and are all answered;
- the jobs, by id: each one's state, progress and preview, and a cancel (a queued job is dropped,
  a running one stops after its current step and returns the images it has).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..annotators.weights import offered_weights
from ..choices import DType
from ..generation.check import CheckedRequest, check
from ..generation.defaults import MODEL_SETTINGS, model_settings
from ..generation.request import GenerationRequest, LoraRequest
from ..generation.sizes import final_size
from ..imageio import read_image, read_mask
from ..model.control import control_type_choices
from .jobs import Job, JobTable, UnknownJob
from .limits import Limits
from .uploads import Uploads, megapixels

if TYPE_CHECKING:
    from ..families.protocol import BaseModel

__all__ = ["BusyError", "Job", "Limits", "Output", "ServeConfig", "Service", "UnknownJob"]


class BusyError(RuntimeError):
    """The queue is full (HTTP 503); nothing was started."""


@dataclass
class ServeConfig:
    """Server-side settings: the models and where they run. ``None`` model paths: the bundled model.

    out_dir: where results (images, grid, sidecar) and the uploads they read are kept; None keeps
    them in a per-server temporary folder that is removed when the server stops.
    """

    base: str | None = None
    controlnets: tuple[str, ...] = ()
    #: which bundled stack (:data:`controlnet.bundled.BUNDLED_MODELS`) serves where no model is given
    family: str = "unet"
    device: str = "cpu"
    dtype: DType = DType.FLOAT32
    offload: bool = False  # text encoders and VAE in CPU memory, on the GPU only while they run
    fp8: bool = False  # the transformer families' block weights in float8, products in FP8
    captioner: str | None = None
    vae: str | None = None  # used in place of the base model's VAE
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale): merged into the base model
    out_dir: str | None = None
    limits: Limits = field(default_factory=Limits)
    #: weight files or folders offered to the learned annotators, besides those in the annotator
    #: folder; clients choose them by name (:func:`controlnet.annotators.weights.offered_weights`)
    annotator_weights: tuple[str, ...] = ()


@dataclass
class Output:
    """One finished generation, as the shells show it."""

    images: list[Path]
    grid: Path
    sidecar: Path
    record: dict[str, Any]  # the sidecar's content
    conditions: list[np.ndarray]  # (H, W, 3) uint8 per control, as fed to the model
    seeds: list[int]
    prompt: str
    seconds: float
    #: (steps done, of total) where a stop ended the generation early; None: it ran to the end
    stopped_at: tuple[int, int] | None = None


def _unique_names(paths: list[str]) -> dict[str, str]:
    """ControlNet choices by name: the file's stem, numbered when two files share one."""
    names: dict[str, str] = {}
    for p in paths:
        stem = Path(p).name.removesuffix(".safetensors") or "controlnet"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names[name] = p
    return names


class Service:
    """Models, limits, uploads and the single generation worker of one server.

    Construct it once per process (it loads the models); call :meth:`close` when done.
    """

    def __init__(self, config: ServeConfig, cache: Any = None) -> None:
        from ..bundled import bundled_path, bundled_stack
        from ..generation.pipeline import ModelCache

        self.config = config
        self.limits = config.limits
        stack = bundled_stack(config.family)
        for p in [config.base, *config.controlnets]:
            if p is not None and not Path(p).exists():
                raise FileNotFoundError(f"model file {p} does not exist")
        base = config.base or str(_bundled(bundled_path, stack.base, "--base"))
        controlnets = list(config.controlnets) or [
            str(_bundled(bundled_path, stack.controlnet, "--controlnet"))
        ]
        self.base = base
        #: the request defaults the web app shows and the API fills in: the settings the served
        #: base carries (the bundled models' their own), else SD's
        self.defaults = GenerationRequest(**model_settings(base))
        self.controlnets = _unique_names(controlnets)
        #: the learned annotators' weights, by the names clients give (no client names a path)
        self.annotator_weights = offered_weights(config.annotator_weights)
        # a bad dtype, or offloading on the CPU, fails at start, not later
        check(GenerationRequest(dtype=config.dtype, device=config.device, offload=config.offload))
        self.cache = cache or ModelCache(size=len(controlnets) + 1 + (config.vae is not None))
        #: each ControlNet's control types (a Union ControlNet's modes, by name or number; None: one kind)
        self.control_types: dict[str, list[str] | None] = {}
        base_model = self._load_models()
        self.native_size = base_model.native_size
        self._check_clip_skip = base_model.check_clip_skip

        self._tmp = Path(tempfile.mkdtemp(prefix="controlnet-serve-"))
        # uploads inside the output folder: sidecars name them relative to it
        self.out_dir = Path(config.out_dir) if config.out_dir else self._tmp / "outputs"
        self.upload_dir = self.out_dir / "uploads"
        self.incoming_dir = self._tmp / "incoming"
        for d in (self.out_dir, self.upload_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.uploads = Uploads(self.limits, self.upload_dir, self.incoming_dir)

        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controlnet-worker")
        self._lock = threading.Lock()
        self._waiting = self._running = self._max_running = self._done = self._failed = 0
        self._closed = False
        self._jobs = JobTable(keep=self.limits.max_queue + 64)
        self._current: Job | None = None

    # ------------------------------------------------------------------ models
    def _load_models(self) -> BaseModel:
        """Load every model once (into the cache), check the ControlNets fit the base, and return
        the base."""
        dtype, device = DType.parse(self.config.dtype).torch, self.config.device
        # LoRAs are read and merged now: a bad file stops the server from starting
        base = self.cache.base(self.base, dtype, device, self.config.loras, offload=self.config.offload)
        if self.config.vae is not None:  # read now: a bad file stops the server from starting
            self.cache.vae(self.config.vae, base, self.base, device)
        loaded = []
        for name, path in self.controlnets.items():
            cn = self.cache.controlnet(path, dtype, device, (self.base, self.config.loras))
            base.check_controlnet(
                cn, controlnet_name=f"ControlNet {name} ({path})", base_name=f"the base model {self.base}"
            )
            self.control_types[name] = control_type_choices(cn)
            loaded.append(cn)
        if self.config.fp8:  # now: a family without FP8 stops the server from starting
            base.use_fp8(loaded)
        return base

    def controlnet_path(self, name: str | None) -> str:
        """The file of the ControlNet called ``name`` (None: the first one the server was given)."""
        if name is None or name == "":
            return next(iter(self.controlnets.values()))
        if name not in self.controlnets:
            raise ValueError(f"unknown ControlNet {name!r}; this server has: {', '.join(self.controlnets)}")
        return self.controlnets[name]

    # ------------------------------------------------------------------ uploads
    def store_image(self, source: bytes | str | Path | np.ndarray, what: str, *, mask: bool = False) -> str:
        """An upload checked and stored as a PNG: its path (:meth:`Uploads.store`)."""
        return self.uploads.store(source, what, mask=mask)

    # ------------------------------------------------------------------ requests and limits
    def output_size(self, checked: CheckedRequest) -> tuple[int, int]:
        """(H, W) of the images a checked request will make, hires fix included
        (:func:`controlnet.generation.generate.final_size`)."""
        return final_size(checked, self.native_size)

    def check(self, request: GenerationRequest) -> CheckedRequest:
        """The request with the server's settings filled in, checked once, in full: this server's
        limits, then the request's own check (:func:`controlnet.generation.check.check`), then
        what depends on the models served (the text encoder's layers, the output size). The one
        place limits are enforced, for the web app and the API alike. ValueError naming the
        parameter and the limit otherwise; uploads are named by their field, not by their file."""
        lim = self.limits
        for name in ("steps", "hires_steps"):
            steps = getattr(request, name)
            if isinstance(steps, int) and steps > lim.max_steps:
                raise ValueError(f"{name}={steps} is over this server's limit of {lim.max_steps}")
        if isinstance(request.num_samples, int) and request.num_samples > lim.max_samples:
            raise ValueError(
                f"num_samples={request.num_samples} is over this server's limit of {lim.max_samples}"
            )
        if len(request.controls) > lim.max_controls:
            raise ValueError(
                f"{len(request.controls)} controls is over this server's limit of {lim.max_controls}"
            )
        controls = []
        for i, c in enumerate(request.controls):
            if c.controlnet not in self.controlnets.values():
                raise ValueError(f"control {i}: ControlNet must be one of: {', '.join(self.controlnets)}")
            if c.preprocess is not None:
                c = replace(c, params=self.annotator_params(c.preprocess, c.params, f"controls[{i}].params."))
            controls.append(c)
        request = replace(
            request,
            controls=controls,
            base=self.base,
            device=self.config.device,
            dtype=self.config.dtype,
            offload=self.config.offload,
            fp8=self.config.fp8,
            captioner=self.config.captioner,
            vae=self.config.vae,
            loras=[LoraRequest(path, scale) for path, scale in self.config.loras],
            fast=False,
        )
        try:
            checked = check(request)
            self._check_clip_skip(checked.request.clip_skip)
        except ValueError as e:  # name uploads by their field, not by their file on this server
            message = str(e)
            for name, path in _upload_fields(request).items():
                message = message.replace(path, name)
            raise ValueError(message) from None
        h, w = self.output_size(checked)
        if megapixels(h, w) > lim.max_megapixels:
            raise ValueError(
                f"the output would be {w}x{h} ({megapixels(h, w):.2f} megapixels), over this server's "
                f"limit of {lim.max_megapixels:g} megapixels: lower resolution (or width/height, or "
                "hires_scale)"
            )
        return checked

    # ------------------------------------------------------------------ the worker
    def submit(self, request: GenerationRequest) -> Job:
        """Check ``request`` (:meth:`check`) and queue it; the job's future gives an
        :class:`Output`. Raises ValueError for a bad request and BusyError when the queue is full
        (nothing is queued)."""
        checked = self.check(request)
        with self._lock:
            if self._closed:
                raise BusyError("the server is shutting down")
            if self._waiting >= self.limits.max_queue:
                raise BusyError(
                    f"the server is busy: {self._waiting} generations are waiting (limit "
                    f"{self.limits.max_queue}); try again later"
                )
            self._waiting += 1
            job = Job()
            self._jobs.add(job)
            job.future = self._worker.submit(self._run, checked, job)
        return job

    def job(self, job_id: str) -> Job:
        """The job of that id; UnknownJob otherwise."""
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one is dropped (it never runs), a running one stops after its
        current step and returns the images it has; a finished one stays as it is."""
        job = self.job(job_id)
        with self._lock:
            if job.future.cancel():  # still queued: it will not run
                self._waiting -= 1
                job.cancelled = True
                return job
        job.watch.stop()
        return job

    def current(self) -> Job | None:
        """The running job, if any."""
        with self._lock:
            return self._current

    def interrupt(self) -> Job | None:
        """Stop the running job (it returns the images it has); the queue goes on. The job, or None."""
        job = self.current()
        if job is not None:
            job.watch.stop()
        return job

    def generate(
        self, request: GenerationRequest, on_progress: Callable[[int, int], None] | None = None
    ) -> Output:
        """Queue ``request``, wait for it and return its output (blocking)."""
        return self.wait(self.submit(request), on_progress)

    def wait(self, job: Job, on_progress: Callable[[int, int], None] | None = None) -> Output:
        """Wait for ``job`` and return its output (CancelledError if it was dropped from the
        queue); ``on_progress(step, total)`` is called about five times a second meanwhile."""
        if on_progress is None:
            return job.future.result()
        while True:
            try:
                return job.future.result(timeout=0.2)
            except FutureTimeout:  # still queued or running
                on_progress(job.step, job.total)

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker (between generations) and return its result: for work that
        may use the device, such as learned annotators."""
        return self._worker.submit(fn).result()

    def _run(self, checked: CheckedRequest, job: Job) -> Output:
        from ..generation.pipeline import run

        with self._lock:
            self._waiting -= 1
            self._running += 1
            self._max_running = max(self._max_running, self._running)
            self._current = job
        try:
            result, sidecar = run(
                checked,
                self.out_dir,
                cache=self.cache,
                progress=False,
                watch=job.watch,
                names=self.public_names(),
            )
            assert sidecar is not None
            record = json.loads(sidecar.read_text())
            output = Output(
                images=[sidecar.parent / i["file"] for i in record["outputs"]["images"]],
                grid=sidecar.parent / record["outputs"]["grid"],
                sidecar=sidecar,
                record=record,
                conditions=result.conditions,
                seeds=result.seeds,
                prompt=result.prompt,
                seconds=result.seconds,
                stopped_at=result.stopped_at,
            )
        except BaseException:
            with self._lock:
                self._failed += 1
            raise
        finally:
            with self._lock:
                self._running -= 1
                self._current = None
        with self._lock:
            self._done += 1
        return output

    # ------------------------------------------------------------------ annotators
    def preprocess(
        self,
        name: str,
        image: str,
        params: dict[str, Any],
        *,
        mask: str | None = None,
        resolution: int | None = None,
        detect_resolution: int | None = None,
    ) -> np.ndarray:
        """The condition map of a stored image (see :func:`controlnet.annotators.prepare_condition`).
        Annotators that load weights run on the worker, since they use the device too."""
        from .. import annotators as A

        annotator = A.get(name)
        params = self.annotator_params(name, params)
        if mask is not None and "mask" not in annotator.inputs:
            raise ValueError(f"annotator {name} takes no mask")
        with Image.open(image) as img:
            size = (img.height, img.width)
        A.condition_size(size, detect_resolution, "detect_resolution")  # before any work
        if resolution is not None:
            h, w = A.condition_size(size, resolution, "resolution")  # type: ignore[misc]
            if megapixels(h, w) > self.limits.max_megapixels:
                raise ValueError(
                    f"the map would be {w}x{h} ({megapixels(h, w):.2f} megapixels), over this server's "
                    f"limit of {self.limits.max_megapixels:g} megapixels: lower resolution"
                )
        extra = {"mask": read_mask(mask)} if mask is not None else {}

        def work() -> np.ndarray:
            return A.prepare_condition(
                name,
                read_image(image),
                resolution=resolution,
                detect_resolution=detect_resolution,
                **params,
                **extra,
            )

        return self.run_exclusive(work) if annotator.needs_weights else work()

    def annotator_params(self, name: str, params: dict[str, Any], where: str = "") -> dict[str, Any]:
        """``params`` of annotator ``name`` checked, with the defaults, and a ``weights`` name
        turned into the file this server offers by that name. ValueError for a name the server does
        not offer: a client chooses among the names of :attr:`annotator_weights`, never a path."""
        from .. import annotators as A

        annotator = A.get(name)
        params = annotator.check_params(params)
        if "weights" in params and annotator.needs_weights:
            value = params["weights"]
            if value not in self.annotator_weights:
                offered = ", ".join(self.annotator_weights) or "none"
                raise ValueError(
                    f"{where}weights: this server offers no annotator weights named {value!r} "
                    f"(it offers: {offered}; the server's operator adds more with "
                    "serve --annotator-weights PATH)"
                )
            params["weights"] = str(self.annotator_weights[value])
        return params

    def public_names(self) -> dict[str, str]:
        """The server's files as its clients know them (their sidecars name no server path):
        ControlNets and annotator weights by the names the server offers them under; other
        files outside the output folder go by their file name."""
        named = {**self.controlnets, **self.annotator_weights}
        return {str(Path(p).resolve()): name for name, p in named.items()}

    # ------------------------------------------------------------------ state
    def health(self) -> dict[str, Any]:
        """The server's state: queue, counts, models, limits."""
        with self._lock:
            queue = {
                "waiting": self._waiting,
                "running": self._running,
                "done": self._done,
                "failed": self._failed,
                "max_concurrent": self._max_running,
            }
        return {
            "status": "ok",
            "queue": queue,
            "device": self.config.device,
            "dtype": DType.parse(self.config.dtype).value,
            "controlnets": list(self.controlnets),
            "control_types": {k: v and list(v) for k, v in self.control_types.items()},
            "native_size": self.native_size,
            "defaults": {k: getattr(self.defaults, k) for k in MODEL_SETTINGS},  # the model's own
            "limits": asdict(self.limits),
        }

    def close(self) -> None:
        """Finish the running job, drop the queued ones, stop the worker, remove the temporary folder."""
        with self._lock:
            self._closed = True
        self._worker.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bundled(bundled_path: Callable[[str], Path], name: str, flag: str) -> Path:
    try:
        return bundled_path(name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"this build has no bundled model ({name}); start the server with {flag} FILE"
        ) from None


def _upload_fields(request: GenerationRequest) -> dict[str, str]:
    """The stored upload behind each image field of ``request``: the images among the files the
    sidecar records, by the same names; the request's own first (an upload stored once may be
    named by several fields: a message names it by the first)."""
    from ..generation.sidecar import input_files

    files = input_files(request)
    fields = {k: files[k] for k in ("init_image", "mask") if k in files}
    fields.update({k: v for k, v in files.items() if k.endswith((".image", ".region_mask"))})
    return fields
