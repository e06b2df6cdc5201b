"""Flux.1's token grid: latents as 2x2 patches and their rotary positions (the transformer, its
ControlNets and the benchmark all read latents this way)."""

from __future__ import annotations

import functools

import torch

__all__ = ["image_ids", "pack", "text_ids", "unpack"]


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, channels (C, dy, dx), rows first."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


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
