"""Qwen-Image (issue 34): its base model behind the protocol and its ControlNet, our own code on
the generic controlled copy. Its files and its place in the family registry are to follow."""

from .base import QwenImageBase
from .controlnet import QwenImageControlNet, QwenImageControlNetConfig

__all__ = ["QwenImageBase", "QwenImageControlNet", "QwenImageControlNetConfig"]
