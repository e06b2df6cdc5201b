"""The Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) as a plug-in of the family registry
(:mod:`controlnet.families`): their files are read by :mod:`controlnet.formats`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ...formats import api
from ...formats import load_vae as _load_vae
from ...formats import merge_loras as _merge_loras
from .base import UNetBase

__all__ = [
    "BASE",
    "LABEL",
    "NAME",
    "detect",
    "generation_settings",
    "load_base",
    "load_controlnet",
    "load_vae",
    "merge_loras",
    "needs_base",
]

NAME = "sd"
LABEL = "Stable Diffusion (SD1.x, SD2.x, SDXL)"
BASE = UNetBase


def detect(path: str | Path) -> str:
    """What the file or folder holds (the format's layout), or CheckpointError."""
    d = api.detect(path)
    if d.family != NAME:
        raise CheckpointError(f"{path}: not a Stable Diffusion model ({d.layout})")
    return d.layout


def generation_settings(path: str | Path) -> dict[str, Any]:
    return api.generation_settings(path)


def load_base(path: str | Path, *, dtype: Any = None) -> UNetBase:
    return api.load_base(path, dtype=dtype)


def load_controlnet(path: str | Path, *, dtype: Any = None, base_network: Any = None) -> Any:
    return api.load_controlnet(path, dtype=dtype, base_unet=base_network)


def needs_base(path: str | Path) -> bool:
    return api.needs_base(path)


def load_vae(path: str | Path, *, base: UNetBase) -> Any:
    return _load_vae(path, like=base.vae, dtype=base.vae.dtype)


def merge_loras(base: UNetBase, loras: Any) -> None:
    _merge_loras(base, loras)
