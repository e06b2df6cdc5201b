"""Flux.1 (Black Forest Labs): a rectified-flow transformer of double- and single-stream blocks.

So far its ControlNet (:mod:`.controlnet`); the base model's plug-in of the family protocol,
its files and generation follow (see issue 30's plan in docs/architecture.md).
"""

from .controlnet import FluxControlNet, FluxControlNetConfig, FluxResiduals

__all__ = ["FluxControlNet", "FluxControlNetConfig", "FluxResiduals"]
