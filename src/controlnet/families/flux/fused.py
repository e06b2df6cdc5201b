"""Flux's transformer blocks with their elementwise work fused: the arithmetic of diffusers'
``FluxTransformerBlock`` and ``FluxSingleTransformerBlock`` (their modules, weights and keys
unchanged) in fewer kernels.

Between its matrix products a Flux block spends a third of its GPU time on small elementwise
kernels and copies: the adaptive layer norms' modulation, the gates and residual additions, the
RMS norms of queries and keys (computed in float32 and cast back) and the rotary embedding (seven
kernels and two float32 copies per tensor), the joining of the text and image streams. Here each
of those groups is one function - :func:`modulate`, :func:`gated_add`, :func:`rms_rope` - which on
a GPU runs as one generated kernel (``torch.compile`` of that function alone, for any shape:
seconds, once), and keeps float32 inside until its single rounding. Where a whole block is
compiled (``--fast``), inductor sees the same functions and fuses across them.

:func:`fuse_blocks` gives a network's stock blocks this forward (their class becomes the fused
subclass: same parameters, same state dict, same call); blocks with another attention processor
(IP-Adapter, a user's own) keep diffusers' forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

__all__ = ["FusedFluxSingleTransformerBlock", "FusedFluxTransformerBlock", "fuse_blocks", "stock_blocks"]

Fn = TypeVar("Fn", bound=Callable[..., Any])
_COMPILED: dict[str, Callable[..., Any]] = {}


def _kernel(fn: Fn) -> Fn:
    """``fn`` as one generated kernel on a GPU (compiled on first use, for any shape); as it is on
    a CPU, and inside a region that is being compiled or captured whole (which fuses it anyway)."""

    def call(*args: Any) -> Any:
        first = args[0][0] if isinstance(args[0], tuple) else args[0]
        if not first.is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        compiled = _COMPILED.get(fn.__name__)
        if compiled is None:
            compiled = _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
        if compiled is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # no compiler here (no Triton): the same arithmetic, unfused
            _COMPILED[fn.__name__] = fn
            warnings.warn(
                f"fused kernels unavailable, running them unfused: {type(e).__name__}: {e}", stacklevel=2
            )
            return fn(*args)

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call  # type: ignore[return-value]


@_kernel
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine (``eps``), then ``* (1 + scale) + shift`` per sample."""
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


@_kernel
def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``, the gate per sample."""
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


@_kernel
def rms_rope(
    parts: tuple[torch.Tensor, ...],
    weights: tuple[torch.Tensor, ...],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Queries or keys of each stream, (B, L_i, H, D): each RMS-normalised with its weight, joined
    along the tokens, rotated by the rotary embedding (cos, sin: (L, D), pairs interleaved), and
    laid out (B, H, L, D) for attention."""
    normed = []
    for x, w in zip(parts, weights):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed.append(xf * w.float())
    x = torch.cat(normed, dim=1) if len(normed) > 1 else normed[0]
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = x * cos[:, None].float() + rotated * sin[:, None].float()
    return out.to(parts[0].dtype).transpose(1, 2).contiguous()


@_kernel
def joined(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Values of each stream, (B, L_i, H, D), joined along the tokens and laid out (B, H, L, D)."""
    x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return x.transpose(1, 2).contiguous()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _attention(
    attn: nn.Module,
    streams: list[torch.Tensor],
    added: bool,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Joint attention over the streams (text first when ``added``: its own projections), output
    (B, L, H * D) over all tokens."""
    d = attn.head_dim
    if added:
        text, image = streams
        qs = (_heads(attn.add_q_proj(text), d), _heads(attn.to_q(image), d))
        ks = (_heads(attn.add_k_proj(text), d), _heads(attn.to_k(image), d))
        vs = (_heads(attn.add_v_proj(text), d), _heads(attn.to_v(image), d))
        qw = (attn.norm_added_q.weight, attn.norm_q.weight)
        kw = (attn.norm_added_k.weight, attn.norm_k.weight)
    else:
        (x,) = streams
        qs, ks, vs = (_heads(attn.to_q(x), d),), (_heads(attn.to_k(x), d),), (_heads(attn.to_v(x), d),)
        qw, kw = (attn.norm_q.weight,), (attn.norm_k.weight,)
    cos, sin = rotary
    q = rms_rope(qs, qw, attn.norm_q.eps, cos, sin)
    k = rms_rope(ks, kw, attn.norm_k.eps, cos, sin)
    out = F.scaled_dot_product_attention(q, k, joined(vs))
    return out.transpose(1, 2).flatten(2)


def _fusable(block: nn.Module) -> bool:
    """A stock block: diffusers' attention processor and RMS norms with weights."""
    attn = block.attn
    return type(attn.processor) is FluxAttnProcessor and all(
        getattr(getattr(attn, n, None), "weight", None) is not None for n in ("norm_q", "norm_k")
    )


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """Flux's double-stream block (text and image streams, joint attention), fused."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_rotary_emb is None or joint_attention_kwargs:
            return super().forward(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
        x, c = hidden_states, encoder_hidden_states
        shift, scale, gate, shift2, scale2, gate2 = self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)
        cshift, cscale, cgate, cshift2, cscale2, cgate2 = self.norm1_context.linear(
            self.norm1_context.silu(temb)
        ).chunk(6, dim=1)
        eps = self.norm1.norm.eps
        out = _attention(
            self.attn,
            [modulate(c, cshift, cscale, self.norm1_context.norm.eps), modulate(x, shift, scale, eps)],
            True,
            image_rotary_emb,
        )
        text = c.shape[1]
        x = gated_add(x, gate, self.attn.to_out[0](out[:, text:]))
        c = gated_add(c, cgate, self.attn.to_add_out(out[:, :text]))
        x = gated_add(x, gate2, self.ff(modulate(x, shift2, scale2, self.norm2.eps)))
        c = gated_add(c, cgate2, self.ff_context(modulate(c, cshift2, cscale2, self.norm2_context.eps)))
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return c, x


class FusedFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """Flux's single-stream block (text and image tokens as one sequence), fused; its output
    projection reads the attention and MLP halves in place instead of joining them."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_rotary_emb is None or joint_attention_kwargs:
            return super().forward(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
        text = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        n = modulate(h, shift, scale, self.norm.norm.eps)
        mlp = self.act_mlp(self.proj_mlp(n))
        attn = _attention(self.attn, [n], False, image_rotary_emb)
        dim = attn.shape[-1]
        w = self.proj_out.weight
        y = F.linear(mlp, w[:, dim:], self.proj_out.bias)  # the MLP's columns of the weight, then
        y.view(-1, y.shape[-1]).addmm_(attn.reshape(-1, dim), w[:, :dim].t())  # the attention's, added
        h = gated_add(h, gate, y)
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h[:, :text], h[:, text:]


_FUSED = {
    FluxTransformerBlock: FusedFluxTransformerBlock,
    FluxSingleTransformerBlock: FusedFluxSingleTransformerBlock,
}


def fuse_blocks(network: nn.Module) -> int:
    """Give each stock Flux block of ``network`` the fused forward (in place); how many."""
    n = 0
    for m in network.modules():
        fused = _FUSED.get(type(m))
        if fused is not None and _fusable(m):
            m.__class__ = fused
            n += 1
    return n


@contextmanager
def stock_blocks(network: nn.Module) -> Iterator[None]:
    """Within: ``network``'s fused blocks run diffusers' own forward (to measure or check against it)."""
    swapped = [m for m in network.modules() if type(m) in _FUSED.values()]
    for m in swapped:
        m.__class__ = m.__class__.__bases__[0]
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = _FUSED[type(m)]
