"""SD3 / SD3.5 as a plug-in of the family registry (:mod:`controlnet.families`): its files are
read by :mod:`controlnet.formats` (``dit_base``, ``dit_controlnet``)."""

from __future__ import annotations

from typing import Any

from ..dit_plugin import plugin_functions
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


_functions = plugin_functions(NAME, LABEL, BASE, SETTINGS)
detect = _functions["detect"]
generation_settings = _functions["generation_settings"]
load_base = _functions["load_base"]
load_controlnet = _functions["load_controlnet"]
needs_base = _functions["needs_base"]
load_vae = _functions["load_vae"]
merge_loras = _functions["merge_loras"]
