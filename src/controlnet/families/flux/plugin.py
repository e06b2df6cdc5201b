"""Flux.1 as a plug-in of the family registry (:mod:`controlnet.families`): its files are read by
:mod:`controlnet.formats` (``flux``, ``dit_base``, ``flux_files``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ...formats import api
from .base import FluxBase

__all__ = [
    "BASE",
    "LABEL",
    "NAME",
    "SETTINGS",
    "detect",
    "generation_settings",
    "load_base",
    "load_controlnet",
    "load_vae",
    "merge_loras",
    "needs_base",
]

NAME = "flux"
LABEL = "Flux.1"
BASE = FluxBase
#: how Flux.1 samples (Black Forest Labs' and diffusers' defaults): Euler over its shifted
#: flow-matching schedule, 28 steps, guidance 3.5 read by the network; no negative or added prompt
SETTINGS: dict[str, Any] = {
    "sampler": "euler",
    "steps": 28,
    "guidance": 3.5,
    "negative_prompt": "",
    "added_prompt": "",
    "prompt_syntax": "plain",
}


def detect(path: str | Path) -> str:
    d = api.detect(path)
    if d.family != NAME:
        raise CheckpointError(f"{path}: not a Flux.1 model ({d.layout})")
    return d.layout


def generation_settings(path: str | Path) -> dict[str, Any]:
    return dict(SETTINGS) if "base" in api.detect(path).kinds else {}


def load_base(path: str | Path, *, dtype: Any = None) -> FluxBase:
    base = api.load_base(path, dtype=dtype)
    assert isinstance(base, FluxBase)
    return base


def load_controlnet(path: str | Path, *, dtype: Any = None, base_network: Any = None) -> Any:
    return api.load_controlnet(path, dtype=dtype)


def needs_base(path: str | Path) -> bool:
    return False


def load_vae(path: str | Path, *, base: FluxBase) -> Any:
    raise ValueError(f"{path}: a separate VAE for a Flux.1 model is not supported yet")


def merge_loras(base: FluxBase, loras: Any) -> None:
    raise ValueError("LoRA files for Flux.1 models are not supported yet")
