"""Qwen-Image as a plug-in of the family registry (:mod:`controlnet.families`): its files are read
by :mod:`controlnet.formats` (``lm_base``, ``dit_controlnet``)."""

from __future__ import annotations

from typing import Any

from ..dit_plugin import plugin_functions
from .base import QwenImageBase

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

NAME = "qwenimage"
LABEL = "Qwen-Image"
BASE = QwenImageBase
#: how Qwen-Image samples (diffusers' QwenImage pipelines and the model card): Euler over its
#: dynamically shifted flow-matching schedule, 50 steps, true classifier-free guidance 4 against
#: the card's negative prompt, a single space
SETTINGS: dict[str, Any] = {
    "sampler": "euler",
    "steps": 50,
    "guidance": 4.0,
    "negative_prompt": " ",
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
