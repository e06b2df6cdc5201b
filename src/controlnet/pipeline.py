"""A generation from files to files: what ``controlnet generate`` and the web app run.

Resolves the model paths (the bundled model when none is given), loads each model once per
process (kept in a small cache keyed by path, modification time, dtype and device), runs
:func:`controlnet.generate.generate` and writes the images, grid and sidecar.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .bundled import BUNDLED_BASE, BUNDLED_CONTROLNET, bundled_path
from .controlnet import ControlNet
from .generate import _DTYPES, GenerationRequest, GenerationResult, generate
from .models import BaseModel

__all__ = ["ModelCache", "resolve_paths", "run"]


def resolve_paths(request: GenerationRequest) -> GenerationRequest:
    """The request with every model path filled in (the bundled files where none is given), so
    that the sidecar names the files that were actually used."""
    base = request.base or str(bundled_path(BUNDLED_BASE))
    controls = [
        c if c.controlnet else replace(c, controlnet=str(bundled_path(BUNDLED_CONTROLNET)))
        for c in request.controls
    ]
    return replace(request, base=base, controls=controls)


class ModelCache:
    """Loaded models by (path, mtime, dtype, device), least recently used dropped beyond ``size``."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, kind: str, path: str, dtype: torch.dtype, device: str, load: Callable[[], Any]) -> Any:
        p = Path(path)
        key = (kind, str(p.resolve()), p.stat().st_mtime_ns, dtype, device)
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

    def base(self, path: str, dtype: torch.dtype, device: str) -> BaseModel:
        from .formats import load_base

        return self._get("base", path, dtype, device, lambda: load_base(path, dtype=dtype).to(device, dtype))

    def controlnet(self, path: str, dtype: torch.dtype, device: str) -> ControlNet:
        from .formats import load_controlnet

        return self._get(
            "controlnet", path, dtype, device, lambda: load_controlnet(path, dtype=dtype).to(device).eval()
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
    request = resolve_paths(request)
    cache = cache or _DEFAULT_CACHE
    dtype = _DTYPES[request.dtype]
    base = cache.base(request.base, dtype, request.device)  # type: ignore[arg-type]
    controlnets = [cache.controlnet(c.controlnet, dtype, request.device) for c in request.controls]  # type: ignore[arg-type]
    result = generate(request, base, controlnets, progress=progress, callback=callback)
    sidecar = None
    if out_dir is not None:
        from .sidecar import write_outputs

        sidecar = write_outputs(result, out_dir)
    return result, sidecar
