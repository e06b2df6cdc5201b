"""Z-Image: its base model behind the protocol, its ControlNet (our own code on the paper's
controlled copy, placed among the transformer's layers), the transformer's pass split where the
ControlNet reads it, and its plug-in of the family registry; its files are read and written by
:mod:`controlnet.formats`."""

from .base import ZImageBase
from .controlnet import ZImageControlNet, ZImageControlNetConfig

__all__ = ["ZImageBase", "ZImageControlNet", "ZImageControlNetConfig"]
