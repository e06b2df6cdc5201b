"""Flux.1 as a plug-in of the family registry (:mod:`controlnet.families`): its files are read by
:mod:`controlnet.formats` (``flux``, ``dit_base``, ``flux_files``)."""

from __future__ import annotations

from typing import Any

from ..dit_plugin import plugin_functions
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


_functions = plugin_functions(NAME, LABEL, BASE, SETTINGS)
detect = _functions["detect"]
generation_settings = _functions["generation_settings"]
load_base = _functions["load_base"]
load_controlnet = _functions["load_controlnet"]
needs_base = _functions["needs_base"]
load_vae = _functions["load_vae"]
merge_loras = _functions["merge_loras"]
