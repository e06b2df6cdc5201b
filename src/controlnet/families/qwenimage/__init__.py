"""Qwen-Image: its base model behind the protocol, its ControlNet (our own code on the generic
controlled copy) and its plug-in of the family registry; its files are read and written by
:mod:`controlnet.formats`."""

from .base import QwenImageBase
from .controlnet import QwenImageControlNet, QwenImageControlNetConfig

__all__ = ["QwenImageBase", "QwenImageControlNet", "QwenImageControlNetConfig"]
