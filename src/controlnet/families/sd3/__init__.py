"""Stable Diffusion 3 / 3.5 (Stability AI): an MMDiT of joint blocks over 2x2 latent patches.

So far its ControlNet (:mod:`.controlnet`); the base model's plug-in, its files and generation
follow (issue 30's plan in docs/flux.md).
"""

from .controlnet import SD3ControlNet, SD3ControlNetConfig

__all__ = ["SD3ControlNet", "SD3ControlNetConfig"]
