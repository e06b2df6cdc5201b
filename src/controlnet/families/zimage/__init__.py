"""Z-Image (issue 34): its base model behind the protocol, its ControlNet (our own code on the
paper's controlled copy, placed among the transformer's layers) and the transformer's pass split
where the ControlNet reads it. Its files and its plug-in are to follow."""

from .base import ZImageBase
from .controlnet import ZImageControlNet, ZImageControlNetConfig

__all__ = ["ZImageBase", "ZImageControlNet", "ZImageControlNetConfig"]
