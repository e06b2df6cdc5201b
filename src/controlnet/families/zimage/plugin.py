"""Z-Image as a plug-in of the family registry (:mod:`controlnet.families`): its files are read
by :mod:`controlnet.formats` (``lm_base``, ``dit_controlnet``)."""

from __future__ import annotations

from typing import Any

from ..dit_plugin import plugin_functions
from .base import ZImageBase

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

NAME = "zimage"
LABEL = "Z-Image"
BASE = ZImageBase
#: how Z-Image samples (diffusers' Z-Image pipelines' defaults): Euler over linear levels shifted
#: by 3, 50 steps, classifier-free guidance 6 on the usual scale (the pipelines' guidance_scale 5)
#: against the empty prompt. Z-Image-Turbo, which the published ControlNets are made for, takes
#: 9 steps and no guidance (--steps 9 --guidance 1)
SETTINGS: dict[str, Any] = {
    "sampler": "euler",
    "steps": 50,
    "guidance": 6.0,
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
