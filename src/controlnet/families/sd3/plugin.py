"""SD3 / SD3.5 as a plug-in of the family registry (:mod:`controlnet.families`): its files are
read by :mod:`controlnet.formats` (``dit_base``, ``dit_controlnet``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ...formats import api
from .base import SD3Base

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

NAME = "sd3"
LABEL = "Stable Diffusion 3 / 3.5"
BASE = SD3Base
#: how SD3 samples (diffusers' pipeline defaults): Euler over flow matching shifted by 3, 28 steps,
#: classifier-free guidance 7 against the empty prompt, no added prompt
SETTINGS: dict[str, Any] = {
    "sampler": "euler",
    "steps": 28,
    "guidance": 7.0,
    "negative_prompt": "",
    "added_prompt": "",
    "prompt_syntax": "plain",
}


def detect(path: str | Path) -> str:
    d = api.detect(path)
    if d.family != NAME:
        raise CheckpointError(f"{path}: not an SD3 model ({d.layout})")
    return d.layout


def generation_settings(path: str | Path) -> dict[str, Any]:
    return dict(SETTINGS) if "base" in api.detect(path).kinds else {}


def load_base(path: str | Path, *, dtype: Any = None) -> SD3Base:
    base = api.load_base(path, dtype=dtype)
    assert isinstance(base, SD3Base)
    return base


def load_controlnet(path: str | Path, *, dtype: Any = None, base_network: Any = None) -> Any:
    return api.load_controlnet(path, dtype=dtype)


def needs_base(path: str | Path) -> bool:
    return False


def load_vae(path: str | Path, *, base: SD3Base) -> Any:
    raise ValueError(f"{path}: a separate VAE for an SD3 model is not supported yet")


def merge_loras(base: SD3Base, loras: Any) -> None:
    raise ValueError("LoRA files for SD3 models are not supported yet")
