"""Zero convolutions and the generic controlled block (paper section 3.1).

A locked block F(x; Θ) gets a trainable copy F(·; Θc) and two zero-initialised layers Z:

    y_c = F(x; Θ) + Z2(F(x + Z1(c); Θc))

Both Z output exactly 0 at initialisation, so y_c == F(x) bit for bit. The gradient of Z with
respect to its weight is its input, which is not zero, so the first optimiser step opens the
connection while the locked block never changes.
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

import torch
from torch import nn

__all__ = ["ControlledBlock", "ControlledCopy", "Layout", "zero_conv", "zero_linear", "zero_module"]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to exactly 0 and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def zero_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Conv2d:
    """A conv layer (1x1 by default; padding keeps the size) whose weight and bias are 0."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, device=device, dtype=dtype
    )
    return zero_module(conv)


def zero_linear(
    in_features: int,
    out_features: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Linear:
    """The token-layout twin of a 1x1 zero conv: a Linear over the channel axis, all zeros."""
    return zero_module(nn.Linear(in_features, out_features, device=device, dtype=dtype))


class Layout(Enum):
    """How a block's tensors hold their channels."""

    IMAGE = "nchw"  # (batch, channels, height, width): zero layers are 1x1 convs
    TOKENS = "nlc"  # (batch, tokens, channels): zero layers are Linear maps over channels


def _zero_layer(layout: Layout, cin: int, cout: int, like: torch.Tensor | None) -> nn.Module:
    kw: dict[str, Any] = {}
    if like is not None:
        kw = {"device": like.device, "dtype": like.dtype}
    return zero_conv(cin, cout, **kw) if layout is Layout.IMAGE else zero_linear(cin, cout, **kw)


class ControlledCopy(nn.Module):
    """The trainable side of the formula, for a copy with one output or many:

        r_i = Z_out_i( F_copy(x + Z_in(c))_i )

    Each residual ``r_i`` is added by the locked network to its own output i (a UNet's skips and
    middle block, a transformer's block outputs): y_i + r_i. At initialisation every Z_out is zero,
    so every r_i is exactly 0 and the locked network's output is unchanged.

    A subclass says where the parts live - their attribute names are its checkpoint's keys - by
    :meth:`condition_layer` (Z_in, the condition's way in; for images a small encoder whose last
    layer is zero), :meth:`output_layers` (one Z_out per output) and :meth:`copy_forward`
    (F_copy from its input to its outputs). :meth:`embed_condition` is computed once per
    condition; :meth:`residuals` runs the copy.
    """

    def condition_layer(self) -> nn.Module:
        raise NotImplementedError

    def output_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def copy_forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def embed_condition(self, c: torch.Tensor) -> torch.Tensor:
        """Z_in(c): the condition's features, to be added to the copy's input."""
        return self.condition_layer()(c)

    def residuals(
        self, x: torch.Tensor, condition: torch.Tensor, *args: Any, **kwargs: Any
    ) -> list[torch.Tensor]:
        """Z_out_i(F_copy(x + condition)_i) for each output i, ``condition`` from
        :meth:`embed_condition`; extra arguments (a time embedding, a text context) go to the copy."""
        outputs = self.copy_forward(x + condition, *args, **kwargs)
        layers = self.output_layers()
        if len(outputs) != len(layers):
            raise ValueError(f"the copy gave {len(outputs)} outputs for {len(layers)} zero layers")
        return [z(o) for z, o in zip(layers, outputs)]


class ControlledBlock(ControlledCopy):
    """Wrap any block F with a trainable copy and two zero layers: F(x) + Z2(F_copy(x + Z1(c))).

    Args:
        block: the block to control. It is locked (``requires_grad=False``) in place.
        channels: channels of the block's input ``x``.
        cond_channels: channels of the condition ``c`` (may differ from ``channels``).
        out_channels: channels of the block's output (default: ``channels``).
        layout: where the channel axis is (``Layout.IMAGE`` for NCHW, ``Layout.TOKENS`` for NLC).

    Extra positional and keyword arguments of ``forward`` (a time embedding, a text context, ...)
    go to both the locked block and its copy. The condition must have x's spatial/token shape.
    """

    def __init__(
        self,
        block: nn.Module,
        channels: int,
        cond_channels: int,
        out_channels: int | None = None,
        layout: Layout = Layout.IMAGE,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        like = next(block.parameters(), None)
        self.copy = copy.deepcopy(block).requires_grad_(True)
        self.block = block.requires_grad_(False)
        self.layout = layout
        self.zero_in = _zero_layer(layout, cond_channels, channels, like)
        self.zero_out = _zero_layer(layout, out_channels, out_channels, like)

    def condition_layer(self) -> nn.Module:
        return self.zero_in

    def output_layers(self) -> list[nn.Module]:
        return [self.zero_out]

    def copy_forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [self.copy(h, *args, **kwargs)]

    def forward(self, x: torch.Tensor, c: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.block(x, *args, **kwargs)
        (r,) = self.residuals(x, self.embed_condition(c), *args, **kwargs)
        return y + r
