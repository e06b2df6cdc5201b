"""A generation from files to files: what ``controlnet generate`` and the web app run.

Resolves the model paths (the bundled model when none is given), loads each model once per
process (kept in a small cache keyed by path, modification time, dtype and device), runs
:func:`controlnet.generation.generate.generate` and writes the images, grid and sidecar. A request whose
images name folders (video frames, a set of maps) is a batch: :func:`run_batch` runs one
generation per image, each with its own sidecar.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..bundled import BUNDLED_BASE, BUNDLED_CONTROLNET, bundled_path
from ..families.sd.base import BaseModel
from ..families.sd.controlnet import ControlNet
from ..imageio import list_images
from .generate import _DTYPES, GenerationRequest, GenerationResult, draw_seed, generate

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
        from ..formats import load_base, merge_loras

        def load() -> BaseModel:
            base = load_base(path, dtype=dtype).to(device, dtype, offload=offload)
            if loras:  # (its table of layer names walks the whole model)
                merge_loras(base, loras)
            return base

        return self._get(self.base_label(loras), path, dtype, device, load)

    @staticmethod
    def base_label(loras: Sequence[tuple[str, float]] = ()) -> str:
        """The cache's kind of entry for a base model loaded with ``loras`` (its key: with the path)."""
        if not loras:
            return "base"
        return "base with LoRAs " + "; ".join(f"{_stamp(p)} x {s!r}" for p, s in loras)

    def vae(self, path: str, base: BaseModel, base_path: str, device: str) -> AutoencoderKL:
        """The VAE at ``path`` read into the architecture of ``base``'s (from ``base_path``), in
        the base's VAE dtype."""
        from ..formats import load_vae

        dtype = base.vae.dtype
        return self._get(
            f"vae for {base_path}",
            path,
            dtype,
            device,
            lambda: load_vae(path, like=base.vae, dtype=dtype).to(device).eval(),
        )

    def controlnet(
        self,
        path: str,
        dtype: torch.dtype,
        device: str,
        base: tuple[str, Sequence[tuple[str, float]]] | None = None,
    ) -> ControlNet:
        """The ControlNet at ``path``. A Control-LoRA is built on the UNet of the base model
        ``base`` names, (path, LoRAs) as :meth:`base` takes them, and kept per base."""
        from ..formats import load_controlnet, needs_base

        stamp = _stamp(path)
        if stamp not in self._needs_base:  # once per file version (a pickled file is read whole)
            self._needs_base[stamp] = needs_base(path)
        if not self._needs_base[stamp]:
            return self._get(
                "controlnet",
                path,
                dtype,
                device,
                lambda: load_controlnet(path, dtype=dtype).to(device).eval(),
            )
        if base is None:
            raise ValueError(f"{path}: a Control-LoRA is built on a base model; none was given")
        base_path, loras = base

        def load() -> ControlNet:
            unet = self.base(base_path, dtype, device, loras).unet  # a hit: the caller loaded it
            return load_controlnet(path, dtype=dtype, base_unet=unet).to(device).eval()

        return self._get(
            f"control-lora on {_stamp(base_path)} {self.base_label(loras)}", path, dtype, device, load
        )


_DEFAULT_CACHE = ModelCache()


def run(
    request: GenerationRequest,
    out_dir: str | Path | None = None,
    *,
    cache: ModelCache | None = None,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
) -> tuple[GenerationResult, Path | None]:
    """Check, load, generate and (with ``out_dir``) write; return the result and the sidecar path."""
    request.validate()  # everything that needs no model, before loading anything
    return _load_and_generate(request, out_dir, cache=cache, progress=progress, callback=callback)


def _load_and_generate(
    request: GenerationRequest,
    out_dir: str | Path | None,
    *,
    cache: ModelCache | None,
    progress: bool,
    callback: Callable[[int, int], None] | None = None,
    label: str | None = None,
) -> tuple[GenerationResult, Path | None]:
    """:func:`run` after its checks (``label`` goes into the output names)."""
    request = resolve_paths(request)
    cache = cache or _DEFAULT_CACHE
    dtype = _DTYPES[request.dtype]
    loras = [(lora.path, lora.scale) for lora in request.loras]
    base = cache.base(request.base, dtype, request.device, loras, offload=request.offload)  # type: ignore[arg-type]
    if request.vae is not None:
        # (a VAE is small: generate() places it, offloaded or not)
        base = base.with_vae(cache.vae(request.vae, base, request.base, request.device))  # type: ignore[arg-type]
    controlnets = [
        cache.controlnet(c.controlnet, dtype, request.device, (request.base, loras))  # type: ignore[arg-type]
        for c in request.controls
    ]
    result = generate(request, base, controlnets, progress=progress, callback=callback)
    sidecar = None
    if out_dir is not None:
        from .sidecar import write_outputs

        sidecar = write_outputs(result, out_dir, label=label)
    return result, sidecar


def _image_inputs(request: GenerationRequest) -> list[tuple[str, str]]:
    """(parameter, path) of every image the request reads."""
    named = [(f"controls[{i}].image", c.image) for i, c in enumerate(request.controls)]
    return named + [(n, getattr(request, n)) for n in ("init_image", "mask") if getattr(request, n)]


def expand_folders(request: GenerationRequest) -> list[tuple[str | None, GenerationRequest]]:
    """One (label, request) per batch item. Each image parameter that names a folder takes its
    images in natural name order, folders paired image by image (they must hold as many); a file
    serves every item. Items share the request's seed (one is drawn when it gives none), so that
    frames of a video differ by their inputs only; the label is the first folder's file name. A
    request without folders is the one item ``(None, request)``."""
    folders = {name: list_images(path) for name, path in _image_inputs(request) if Path(path).is_dir()}
    if not folders:
        return [(None, request)]
    counts = {len(files) for files in folders.values()}
    if len(counts) > 1:
        listed = ", ".join(
            f"{name} {path} holds {len(folders[name])}"
            for name, path in _image_inputs(request)
            if name in folders
        )
        raise ValueError(f"folders are paired image by image but hold different numbers of images: {listed}")
    seed = request.seed if request.seed is not None else draw_seed()
    first = next(iter(folders.values()))
    items = []
    for k, labelled in enumerate(first):
        controls = [
            replace(c, image=str(folders[f"controls[{i}].image"][k]))
            if f"controls[{i}].image" in folders
            else c
            for i, c in enumerate(request.controls)
        ]
        files = {n: str(folders[n][k]) for n in ("init_image", "mask") if n in folders}
        items.append((labelled.stem, replace(request, controls=controls, seed=seed, **files)))
    return items


def run_batch(
    request: GenerationRequest,
    out_dir: str | Path,
    *,
    cache: ModelCache | None = None,
    progress: bool = True,
) -> list[tuple[GenerationResult, Path]]:
    """:func:`run` for each item of :func:`expand_folders`, writing each item's outputs under
    ``out_dir``. Every item is checked before the first is generated, so a bad frame stops the
    batch before any work; with ``progress`` a bar (items, ETA) and a line per item go to stderr."""
    items = expand_folders(request)
    for label, item in items:
        try:
            item.validate()
        except (ValueError, FileNotFoundError) as e:
            if label is None:
                raise
            raise type(e)(f"batch item {label}: {e}") from None
    done: list[tuple[GenerationResult, Path]] = []
    batch = items[0][0] is not None
    bar = tqdm(items, desc="batch", unit="generation", disable=not (progress and batch), file=sys.stderr)
    for label, item in bar:
        # checked above: straight to the models
        result, sidecar = _load_and_generate(
            item, out_dir, cache=cache, progress=progress and not batch, label=label
        )
        assert sidecar is not None
        done.append((result, sidecar))
        if progress and batch:
            bar.write(f"{label}: {sidecar.name} ({result.seconds:.1f} s)", file=sys.stderr)
    return done
