"""The hint encoder E(.) of the paper (section 3.2): a small convolutional network that brings a
condition image to the resolution the controlled copy works at, its last layer zero-initialised
(the Z_in of the controlled block for conditions given as pixels)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .zero import zero_conv

__all__ = ["HintEncoder"]


class HintEncoder(nn.Module):
    """Condition image -> features at latent resolution, added once to the copy's input conv.

    Layout of the released weights (SD: 3->16, 16->16, 16->32 s2, 32->32, 32->96 s2, 96->96,
    96->256 s2, then a zero-initialised 256->320): 3x3 convs, SiLU after each but the last.
    Shapes: (B, hint_channels, H, W) -> (B, out_channels, H / 2**(stages-1), W / 2**(stages-1)).
    """

    def __init__(
        self,
        in_channels: int,
        block_channels: tuple[int, ...],
        out_channels: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.conv_in = nn.Conv2d(in_channels, block_channels[0], 3, padding=1, **kw)
        blocks = []
        for cin, cout in itertools.pairwise(block_channels):
            blocks.append(nn.Conv2d(cin, cin, 3, padding=1, **kw))
            blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2, **kw))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_conv(block_channels[-1], out_channels, 3, **kw)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)
