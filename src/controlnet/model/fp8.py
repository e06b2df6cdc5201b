"""FP8 weights and matrix products, an opt-in below the bf16 floor (Hopper and later GPUs).

:func:`to_fp8` replaces a network's linear layers by :class:`FP8Linear`: the weight stored in
float8 (e4m3) with one scale per output row (half the memory of bf16), the input quantised per
token at each call, the product taken by ``torch._scaled_mm`` with the two scales applied to its
float32 accumulator and the bias added, in the input's dtype. A layer that reads one vector per
sample (a block's modulation) keeps its weight in float8 but takes its product in the input's
dtype (``weight_only``): the weight's float8 values are exact in bf16, and each output row is
scaled after the product, so only the weight's rounding differs from bf16 - the modulation's
shift, scale and gate reach every token alike, where a quantised input would err for all of
them. What it costs in agreement is measured, not assumed (``benchmarks/bench_flux.py --fp8``,
``benchmarks/memory_flux.py``; ``tests/test_fp8.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8Linear", "blocks_to_fp8", "to_fp8"]

E4M3 = torch.float8_e4m3fn
_MAX = torch.finfo(E4M3).max  # 448


def _quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, K) -> float8 rows and their float32 scales (rows, 1): row / scale fits e4m3."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / _MAX
    return (x.float() / scale).clamp(-_MAX, _MAX).to(E4M3), scale


class FP8Linear(nn.Module):
    """A linear layer with its weight in float8 and its product in FP8 (see the module's doc)."""

    def __init__(self, linear: nn.Linear, *, weight_only: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_only = weight_only
        with torch.no_grad():
            q, scale = _quantise_rows(linear.weight.detach())
        # the float8 values kept as their bytes, and the scales in float32, whatever dtype the
        # network is later moved to (a module's .to(dtype) casts every floating-point tensor)
        self.register_buffer("weight_bits", q.view(torch.uint8))
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, N): per output row
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(E4M3)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (what the product computes with), in float32."""
        return self.weight_fp8.float() * self.weight_scale.t()

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> FP8Linear:  # type: ignore[override]
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_bits.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.weight_only or rows.shape[0] == 0 or self.in_features % 16 or self.out_features % 16:
            # the product in x's dtype (also for shapes the FP8 product does not take): the float8
            # values exactly, each output row scaled afterwards
            y = (F.linear(x, self.weight_fp8.to(x.dtype)).float() * self.weight_scale).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        q, scale = _quantise_rows(rows)
        out = torch._scaled_mm(
            q,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=None if self.bias is None else self.bias.to(x.dtype),
            out_dtype=x.dtype,
        )
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        product = "bf16 (weight only)" if self.weight_only else "fp8"
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row, {product}"


def blocks_to_fp8(
    network: nn.Module,
    blocks: tuple[type[nn.Module], ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """FP8 for the linear layers of ``network``'s repeated blocks (``blocks``): those that read
    tokens - attention, feed-forward and output projections - with FP8 products, the modulation
    layers, which read one vector per sample, stored in FP8 with their products in bf16
    (``weight_only``); how many. ``device`` / ``dtype``: each block is moved there just before
    its conversion."""
    n = 0
    for block in [m for m in network.modules() if isinstance(m, blocks)]:
        if device is not None or dtype is not None:
            block.to(device=device, dtype=dtype)
        n += to_fp8(block, _reads_tokens)
        n += to_fp8(block, weight_only=True)  # what is left: the modulation layers
    return n


def _reads_tokens(name: str, layer: nn.Linear) -> bool:
    """Whether a block's linear layer reads tokens rather than the one modulation vector per
    sample (Flux's and SD3's ``norm1.linear``, Qwen-Image's ``img_mod.1`` / ``txt_mod.1``,
    Z-Image's ``adaLN_modulation.0``)."""
    return "norm" not in name and "_mod" not in name


def to_fp8(
    network: nn.Module,
    where: Callable[[str, nn.Linear], bool] = lambda name, m: True,
    *,
    weight_only: bool = False,
) -> int:
    """Replace ``network``'s linear layers (those ``where(name, layer)`` picks) by
    :class:`FP8Linear` (``weight_only``: products in the input's dtype), in place; how many. The
    bf16 weights they held are released."""
    n = 0
    for name, module in list(network.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and where(full, child):
                setattr(module, child_name, FP8Linear(child, weight_only=weight_only))
                n += 1
    return n
