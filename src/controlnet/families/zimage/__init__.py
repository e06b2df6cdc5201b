"""Z-Image (issue 34): its ControlNet, our own code on the paper's controlled copy placed among the
transformer's layers, and the transformer's pass split where the ControlNet reads it. Its base
model behind the protocol, its files and its plug-in are to follow."""

from .controlnet import ZImageControlNet, ZImageControlNetConfig

__all__ = ["ZImageControlNet", "ZImageControlNetConfig"]
