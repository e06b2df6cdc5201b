"""Qwen-Image as a plug-in of the family registry (:mod:`controlnet.families`): its files are read
by :mod:`controlnet.formats` (``lm_base``, ``dit_controlnet``)."""

from __future__ import annotations

from ..dit_plugin import DiTPlugin
from .base import QwenImageBase

__all__ = ["PLUGIN"]

#: how Qwen-Image samples (diffusers' QwenImage pipelines and the model card): Euler over its
#: dynamically shifted flow-matching schedule, 50 steps, true classifier-free guidance 4 against
#: the card's negative prompt, a single space
PLUGIN = DiTPlugin("qwenimage", "Qwen-Image", QwenImageBase, steps=50, guidance=4.0, negative_prompt=" ")
