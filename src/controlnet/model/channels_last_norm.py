"""GroupNorm computed in a channels-last tensor's own layout, for compiled training.

PyTorch's group norm works on an (N, groups, C / groups, H * W) view of its input, which only an
NCHW-contiguous tensor has. Compiled into a channels-last network on CUDA, its backward pass hands
part of the convolutions' gradients over in NCHW, and cuDNN's convolution backward converts each
back (an activation-sized copy, every step). :class:`ChannelsLastGroupNorm` computes the same
normalisation over a permuted view, (N, H * W, groups, C / groups), so that its forward and
backward passes are views, reductions and elementwise work in the input's own layout; a compiled
SD1.5 ControlNet training step runs about 3% faster with it (docs/benchmarks.md). Inference
gains nothing from it, so generation keeps the native op. It is the same arithmetic (statistics
in float32, the result in the dtype ``F.group_norm`` returns); :func:`use_channels_last_group_norm`
switches a module's GroupNorm layers to it in place, keeping their parameters, names and state
dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelsLastGroupNorm", "use_channels_last_group_norm"]


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a 4-D channels-last input channels-last in both passes (other
    inputs go through ``F.group_norm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c, h, w = x.shape
        out_dtype = _group_norm_dtype(x)
        nhwc = x.permute(0, 2, 3, 1)  # a contiguous view of a channels-last tensor
        groups = nhwc.reshape(n, h * w, self.num_groups, c // self.num_groups).float()
        var, mean = torch.var_mean(groups, dim=(1, 3), correction=0, keepdim=True)
        y = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(n, h, w, c)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(out_dtype).permute(0, 3, 1, 2)


def _group_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.group_norm(x, ...)`` returns: float32 under CUDA's autocast (a float32-listed
    op there), otherwise x's (the CPU's autocast leaves it alone)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x.dtype


def use_channels_last_group_norm(module: nn.Module) -> int:
    """Switch every ``nn.GroupNorm`` in ``module`` to :class:`ChannelsLastGroupNorm` in place;
    returns how many were switched."""
    count = 0
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = ChannelsLastGroupNorm
            count += 1
    return count
