"""A module's structure without its tensors: a copy whose parameters and buffers are on the meta
device (no memory), to be filled with tensors of its own by ``load_state_dict(..., assign=True)``
or ``to_empty`` (a transferred ControlNet; a sharded run's modules, whole for the export)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["empty_copy"]


def empty_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters (trainable as they were) and buffers are on the
    meta device; everything else (configs, attributes) copied as deep copies are."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)
