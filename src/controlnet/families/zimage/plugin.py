"""Z-Image as a plug-in of the family registry (:mod:`controlnet.families`): its files are read
by :mod:`controlnet.formats` (``lm_base``, ``dit_controlnet``)."""

from __future__ import annotations

from ..dit_plugin import DiTPlugin
from .base import ZImageBase

__all__ = ["PLUGIN"]

#: how Z-Image samples (diffusers' Z-Image pipelines' defaults): Euler over linear levels shifted
#: by 3, 50 steps, classifier-free guidance 6 on the usual scale (the pipelines' guidance_scale 5)
#: against the empty prompt. Z-Image-Turbo, which the published ControlNets are made for, takes
#: 9 steps and no guidance (--steps 9 --guidance 1)
PLUGIN = DiTPlugin("zimage", "Z-Image", ZImageBase, steps=50, guidance=6.0)
