"""A generation from files to files: what ``controlnet generate`` and the web app run.

Resolves the model paths (the bundled model when none is given), loads each model once per
process (kept in a small cache keyed by path, modification time, dtype and device), runs
:func:`controlnet.generation.generate.generate` and writes the images, grid and sidecar. A request whose
images name folders (video frames, a set of maps) is a batch: :func:`run_batch` runs one
generation per image, each with its own sidecar. :func:`run` takes a checked request
(:func:`controlnet.generation.check.check`); :func:`run_batch` checks what it runs.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import families
from ..bundled import BUNDLED_BASE, BUNDLED_CONTROLNET, bundled_path
from ..families.protocol import BaseModel
from ..imageio import list_images, probe_image
from .check import CheckedRequest, check, image_inputs
from .generate import GenerationResult, draw_seed, generate
from .request import GenerationRequest
from .watch import Watch

__all__ = ["ModelCache", "expand_folders", "resolve_paths", "run", "run_batch"]


def resolve_paths(request: GenerationRequest) -> GenerationRequest:
    """The request with every model path filled in (the bundled files where none is given), so
    that the sidecar names the files that were actually used."""
    base = request.base or str(bundled_path(BUNDLED_BASE))
    controls = [
        c if c.controlnet else replace(c, controlnet=str(bundled_path(BUNDLED_CONTROLNET)))
        for c in request.controls
    ]
    return replace(request, base=base, controls=controls)


def _stamp(path: str) -> str:
    """A file's version: its resolved path and modification time."""
    p = Path(path)
    return f"{p.resolve()}@{p.stat().st_mtime_ns}"


class ModelCache:
    """Loaded models by (path, mtime, dtype, device), least recently used dropped beyond ``size``."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._needs_base: dict[str, bool] = {}  # file version -> is a Control-LoRA
        self._lock = threading.Lock()

    def _get(self, kind: str, path: str, dtype: torch.dtype, device: str, load: Callable[[], Any]) -> Any:
        key = (kind, _stamp(path), dtype, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def base(
        self,
        path: str,
        dtype: torch.dtype,
        device: str,
        loras: Sequence[tuple[str, float]] = (),
        *,
        offload: bool = False,
    ) -> BaseModel:
        """The base model at ``path``; with ``loras`` ((file, scale) pairs), a copy of its own with
        them merged into its weights (kept beside the plain one, keyed by the files and scales).
        ``offload``: a model loaded now keeps its text encoders and VAE in CPU memory
        (:meth:`BaseModel.to`; a generation places the parts as its request says)."""

        def load() -> BaseModel:
            base = families.load_base(path, dtype=dtype).to(device, dtype, offload=offload)
            if loras:  # (its table of layer names walks the whole model)
                families.merge_loras(base, loras)
            return base

        return self._get(self.base_label(loras), path, dtype, device, load)

    @staticmethod
    def base_label(loras: Sequence[tuple[str, float]] = ()) -> str:
        """The cache's kind of entry for a base model loaded with ``loras`` (its key: with the path)."""
        if not loras:
            return "base"
        return "base with LoRAs " + "; ".join(f"{_stamp(p)} x {s!r}" for p, s in loras)

    def vae(self, path: str, base: BaseModel, base_path: str, device: str) -> torch.nn.Module:
        """The VAE at ``path`` read into the architecture of ``base``'s (from ``base_path``), in
        the base's VAE dtype."""
        return self._get(
            f"vae for {base_path}",
            path,
            base.dtype,
            device,
            lambda: families.load_vae(path, base=base).to(device).eval(),
        )

    def controlnet(
        self,
        path: str,
        dtype: torch.dtype,
        device: str,
        base: tuple[str, Sequence[tuple[str, float]]] | None = None,
    ) -> torch.nn.Module:
        """The ControlNet at ``path``. A Control-LoRA is built on the network of the base model
        ``base`` names, (path, LoRAs) as :meth:`base` takes them, and kept per base."""
        stamp = _stamp(path)
        if stamp not in self._needs_base:  # once per file version (a pickled file is read whole)
            self._needs_base[stamp] = families.needs_base(path)
        if not self._needs_base[stamp]:
            return self._get(
                "controlnet",
                path,
                dtype,
                device,
                lambda: families.load_controlnet(path, dtype=dtype).to(device).eval(),
            )
        if base is None:
            raise ValueError(f"{path}: a Control-LoRA is built on a base model; none was given")
        base_path, loras = base

        def load() -> torch.nn.Module:
            network = self.base(base_path, dtype, device, loras).denoiser  # a hit: the caller loaded it
            return families.load_controlnet(path, dtype=dtype, base_network=network).to(device).eval()

        return self._get(
            f"control-lora on {_stamp(base_path)} {self.base_label(loras)}", path, dtype, device, load
        )


_DEFAULT_CACHE = ModelCache()


def run(
    checked: CheckedRequest,
    out_dir: str | Path | None = None,
    *,
    cache: ModelCache | None = None,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
    watch: Watch | None = None,
    label: str | None = None,
    names: Mapping[str, str] | None = None,
) -> tuple[GenerationResult, Path | None]:
    """Load the models a checked request names (the bundled ones where it names none), generate
    and (with ``out_dir``) write the images, grid and sidecar; return the result and the sidecar's
    path. ``watch`` follows (and may stop) the generation; ``label`` goes into the output names;
    ``names`` is how a server names its files in the sidecar
    (:func:`~controlnet.generation.sidecar.write_outputs`)."""
    request = resolve_paths(checked.request)
    cache = cache or _DEFAULT_CACHE
    dtype = request.dtype.torch
    loras = [(lora.path, lora.scale) for lora in request.loras]
    base = cache.base(request.base, dtype, request.device, loras, offload=request.offload)  # type: ignore[arg-type]
    if request.vae is not None:
        # (a VAE is small: generate() places it, offloaded or not)
        base = base.with_vae(cache.vae(request.vae, base, request.base, request.device))  # type: ignore[arg-type]
    controlnets = [
        cache.controlnet(c.controlnet, dtype, request.device, (request.base, loras))  # type: ignore[arg-type]
        for c in request.controls
    ]
    checked = replace(checked, request=request)
    result = generate(checked, base, controlnets, progress=progress, callback=callback, watch=watch)
    sidecar = None
    if out_dir is not None:
        from .sidecar import write_outputs

        sidecar = write_outputs(result, out_dir, label=label, names=names)
    return result, sidecar


def expand_folders(request: GenerationRequest) -> list[tuple[str | None, GenerationRequest]]:
    """One (label, request) per batch item. Each image parameter that names a folder takes its
    images in natural name order, folders paired image by image (they must hold as many); a file
    serves every item. Items share the request's seed (one is drawn when it gives none), so that
    frames of a video differ by their inputs only; the label is the first folder's file name. A
    request without folders is the one item ``(None, request)``."""
    inputs = {name: path for name, (path, _) in image_inputs(request).items()}
    folders = {name: list_images(path) for name, path in inputs.items() if Path(path).is_dir()}
    if not folders:
        return [(None, request)]
    counts = {len(files) for files in folders.values()}
    if len(counts) > 1:
        listed = ", ".join(f"{name} {inputs[name]} holds {len(folders[name])}" for name in folders)
        raise ValueError(f"folders are paired image by image but hold different numbers of images: {listed}")
    seed = request.seed if request.seed is not None else draw_seed()
    first = next(iter(folders.values()))
    return [
        (labelled.stem, with_inputs(request, {n: str(paths[k]) for n, paths in folders.items()}, seed=seed))
        for k, labelled in enumerate(first)
    ]


def with_inputs(request: GenerationRequest, inputs: dict[str, str], **changes: Any) -> GenerationRequest:
    """``request`` with the image inputs named in ``inputs`` (as :func:`image_inputs` names them)
    set to other files, and other fields changed as ``changes`` says."""
    controls = list(request.controls)
    for name, path in inputs.items():
        m = re.fullmatch(r"controls\[(\d+)\]\.(\w+)", name)
        if m:
            i = int(m[1])
            controls[i] = replace(controls[i], **{m[2]: path})
        else:
            changes[name] = path
    return replace(request, controls=controls, **changes)


def run_batch(
    request: GenerationRequest,
    out_dir: str | Path,
    *,
    cache: ModelCache | None = None,
    progress: bool = True,
) -> list[tuple[GenerationResult, Path]]:
    """Check ``request`` and run it: once, or for each item of :func:`expand_folders`, writing
    each item's outputs under ``out_dir``. Nothing is generated until the first item has passed
    its check and every other item's images have been found readable (their headers), so a bad
    frame stops the batch before any work; each item's images are then read once, by its check,
    just before it runs. With ``progress`` a bar (items, ETA) and a line per item go to stderr."""
    items = expand_folders(request)
    batch = items[0][0] is not None
    checked = [_labelled(label, check, item) for label, item in items[:1]]
    for label, item in items[1:]:
        _labelled(label, probe_inputs, item)
    done: list[tuple[GenerationResult, Path]] = []
    bar = tqdm(items, desc="batch", unit="generation", disable=not (progress and batch), file=sys.stderr)
    for k, (label, item) in enumerate(bar):
        item_checked = checked[0] if k == 0 else _labelled(label, check, item)
        result, sidecar = run(
            item_checked, out_dir, cache=cache, progress=progress and not batch, label=label
        )
        assert sidecar is not None
        done.append((result, sidecar))
        if progress and batch:
            bar.write(f"{label}: {sidecar.name} ({result.seconds:.1f} s)", file=sys.stderr)
    return done


def _labelled(label: str | None, fn: Callable[[GenerationRequest], Any], item: GenerationRequest) -> Any:
    """``fn(item)``, its errors prefixed with the batch item's label (when it has one)."""
    try:
        return fn(item)
    except (ValueError, FileNotFoundError) as e:
        if label is None:
            raise
        raise type(e)(f"batch item {label}: {e}") from None


def probe_inputs(request: GenerationRequest) -> None:
    """Every image the request reads exists and is an image (its header, no pixels decoded)."""
    for path, _ in image_inputs(request).values():
        probe_image(path)
