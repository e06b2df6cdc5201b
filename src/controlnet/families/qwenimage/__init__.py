"""Qwen-Image (issue 34): its ControlNet, our own code on the generic controlled copy. The base
model, its files and generation are to follow as a family plug-in."""

from .controlnet import QwenImageControlNet, QwenImageControlNetConfig

__all__ = ["QwenImageControlNet", "QwenImageControlNetConfig"]
