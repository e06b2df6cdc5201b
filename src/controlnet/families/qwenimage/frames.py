"""One frame through Qwen-Image's video VAE as 2-D convolutions.

``AutoencoderKLQwenImage`` is a video autoencoder: its convolutions are 3-D and causal in time,
padding a clip's first frames with ``kernel - 1`` frames of zeros in front (later chunks of a
clip read the frames cached before them instead). An image is a clip of one frame, so every
3x3x3 convolution of its encoding and decoding multiplies two of its three time taps by those
zeros: two thirds of the arithmetic, and 3-D kernels where 2-D ones would do. The output frame of
such a convolution is exactly a 2-D convolution of the frame with the kernel's last time tap (the
taps before it only ever meet the padding); :func:`frames_as_images` makes the VAE's convolutions
compute it so while an image is encoded or decoded. Rounding may differ from the 3-D kernels'
(another order of summation); the values do not.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from torch import nn

__all__ = ["frames_as_images"]


def _one_frame(
    self: QwenImageCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None
) -> torch.Tensor:
    """The causal convolution of a clip of one frame with nothing cached before it, in 2-D; any
    other call as the layer's own forward."""
    time_pad = self._padding[4]
    if x.shape[2] != 1 or cache_x is not None or time_pad != self.kernel_size[0] - 1 or self.dilation[0] != 1:
        return QwenImageCausalConv3d.forward(self, x, cache_x)
    frame = F.pad(x[:, :, 0], self._padding[:4])
    out = F.conv2d(
        frame, self.weight[:, :, -1], self.bias, self.stride[1:], 0, self.dilation[1:], self.groups
    )
    return out[:, :, None]


@contextlib.contextmanager
def frames_as_images(vae: nn.Module) -> Iterator[None]:
    """While inside, the causal 3-D convolutions of ``vae`` (a Qwen-Image VAE, or a part of one)
    compute one-frame clips with nothing cached before them as 2-D convolutions (the module
    docstring says why that is exact)."""
    convs = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d)]
    for conv in convs:
        conv.forward = types.MethodType(_one_frame, conv)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for conv in convs:  # (another thread's context may have ended first: both paths are exact)
            vars(conv).pop("forward", None)
