"""SD3 / SD3.5 as a plug-in of the family registry (:mod:`controlnet.families`): its files are
read by :mod:`controlnet.formats` (``dit_base``, ``dit_controlnet``)."""

from __future__ import annotations

from ..dit_plugin import DiTPlugin
from .base import SD3Base

__all__ = ["PLUGIN"]

#: how SD3 samples (diffusers' pipeline defaults): Euler over flow matching shifted by 3, 28 steps,
#: classifier-free guidance 7 against the empty prompt, no added prompt
PLUGIN = DiTPlugin("sd3", "Stable Diffusion 3 / 3.5", SD3Base, steps=28, guidance=7.0)
