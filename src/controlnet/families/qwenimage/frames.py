"""One frame through Qwen-Image's video VAE as 2-D convolutions, its norms as one kernel each.

``AutoencoderKLQwenImage`` is a video autoencoder: its convolutions are 3-D and causal in time,
padding a clip's first frames with ``kernel - 1`` frames of zeros in front (later chunks of a
clip read the frames cached before them instead). An image is a clip of one frame, so every
3x3x3 convolution of its encoding and decoding multiplies two of its three time taps by those
zeros: two thirds of the arithmetic, and 3-D kernels where 2-D ones would do. The output frame of
such a convolution is exactly a 2-D convolution of the frame with the kernel's last time tap (the
taps before it only ever meet the padding); :func:`frames_as_images` makes the VAE's convolutions
compute it so while an image is encoded or decoded, padding in space inside the convolution (no
padded copy of the frame) and in channels-last memory. Rounding may differ from the 3-D
kernels' (another order of summation); the values do not.

Its RMS norms (``F.normalize`` over channels in float32, rounded, then scaled, weighted and
shifted: a pass over the frame, at up to 1328 x 1328 x 96, for each) run as one kernel on a GPU
(:func:`controlnet.model.fused.kernel`), rounding once.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d, QwenImageRMS_norm
from torch import nn

from ...model import fused

__all__ = ["channel_rms_norm", "frames_as_images"]


def _one_frame(
    self: QwenImageCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None
) -> torch.Tensor:
    """The causal convolution of a clip of one frame with nothing cached before it, in 2-D; any
    other call as the layer's own forward."""
    left, right, top, bottom, time_pad, _ = self._padding
    if x.shape[2] != 1 or cache_x is not None or time_pad != self.kernel_size[0] - 1 or self.dilation[0] != 1:
        return QwenImageCausalConv3d.forward(self, x, cache_x)
    # channels-last: the layout tensor-core convolutions take (a frame in channels-first memory is
    # transposed in and out of each one); the first layer's input is turned once, and every later
    # layer's arrives so (elementwise work and the norms keep the layout)
    frame, padding = x[:, :, 0].contiguous(memory_format=torch.channels_last), (top, left)
    if (left, top) != (right, bottom):  # (diffusers pads both sides alike: for any other layer)
        frame, padding = F.pad(frame, self._padding[:4]), (0, 0)
    out = F.conv2d(
        frame, self.weight[:, :, -1], self.bias, self.stride[1:], padding, self.dilation[1:], self.groups
    )
    return out[:, :, None]


@fused.kernel
def channel_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x`` over its channels (dim 1) divided by their L2 norm (at least 1e-12, as
    ``F.normalize``), times ``weight`` (the norm's gamma times its scale) plus ``bias``, in
    ``dtype``; in float32 until its one rounding."""
    xf = x.float()
    y = xf / torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(1e-12) * weight
    return (y if bias is None else y + bias.float()).to(dtype)


def _norm(self: QwenImageRMS_norm, x: torch.Tensor) -> torch.Tensor:
    if not self.channel_first:
        return QwenImageRMS_norm.forward(self, x)
    bias = self.bias if isinstance(self.bias, torch.Tensor) else None  # (no bias: the float 0.0)
    dtype = torch.promote_types(x.dtype, self.gamma.dtype)  # (diffusers' result's: its type promotion)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    return channel_rms_norm(x, self.gamma.float() * self.scale, bias, dtype)


@contextlib.contextmanager
def frames_as_images(vae: nn.Module) -> Iterator[None]:
    """While inside, the causal 3-D convolutions of ``vae`` (a Qwen-Image VAE, or a part of one)
    compute one-frame clips with nothing cached before them as 2-D convolutions, and its RMS
    norms run fused (the module docstring says why both are exact)."""
    layers: list[nn.Module] = []
    for m in vae.modules():
        if isinstance(m, QwenImageCausalConv3d):
            m.forward = types.MethodType(_one_frame, m)  # type: ignore[method-assign]
        elif isinstance(m, QwenImageRMS_norm):
            m.forward = types.MethodType(_norm, m)  # type: ignore[method-assign]
        else:
            continue
        layers.append(m)
    try:
        yield
    finally:
        for m in layers:  # (another thread's context may have ended first: both paths are exact)
            vars(m).pop("forward", None)
