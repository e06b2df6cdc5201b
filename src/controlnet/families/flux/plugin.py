"""Flux.1 as a plug-in of the family registry (:mod:`controlnet.families`): its files are read by
:mod:`controlnet.formats` (``flux``, ``dit_base``, ``flux_files``)."""

from __future__ import annotations

from ..dit_plugin import DiTPlugin
from .base import FluxBase

__all__ = ["PLUGIN"]

#: how Flux.1 samples (Black Forest Labs' and diffusers' defaults): Euler over its shifted
#: flow-matching schedule, 28 steps, guidance 3.5 read by the network; no negative or added prompt
PLUGIN = DiTPlugin("flux", "Flux.1", FluxBase, steps=28, guidance=3.5)
