"""Flux.1's token grid: latents as 2x2 patches (:func:`~controlnet.families.dit.pack`, shared by
the transformer families) and their rotary positions (the transformer, its ControlNets and the
benchmark all read latents this way)."""

from __future__ import annotations

import functools

import torch

from ..dit import pack, unpack

__all__ = ["image_ids", "pack", "text_ids", "unpack"]


@functools.lru_cache(maxsize=16)
def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rotary positions (0, row, column) of the packed tokens of (h, w) latents, made once per
    size on the device (every step reads them; nothing writes them)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


@functools.lru_cache(maxsize=16)
def text_ids(tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rotary positions of the text tokens: all zeros (Flux places text at no position)."""
    return torch.zeros(tokens, 3, device=device, dtype=dtype)
