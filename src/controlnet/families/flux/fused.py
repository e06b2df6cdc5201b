"""Flux's transformer blocks with their elementwise work fused (:mod:`controlnet.model.fused`):
the arithmetic of diffusers' ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``, their
modules and keys unchanged, in fewer kernels. Blocks with another attention processor (IP-Adapter,
a user's own) keep diffusers' forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from ...model import fused

__all__ = ["FusedFluxSingleTransformerBlock", "FusedFluxTransformerBlock", "fuse_blocks", "stock_blocks"]


def _attention(
    attn: nn.Module, streams: list[torch.Tensor], rotary: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Joint attention over [text, image] or one joined stream (:func:`fused.stream_attention`)."""
    return fused.stream_attention(attn, streams, attn.head_dim, *rotary)


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """Flux's double-stream block (text and image streams, joint attention), fused."""

    adds_residual = True  # fused.adding_residuals

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_rotary_emb is None or joint_attention_kwargs:
            c, x = super().forward(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
            return c, fused.plus_residual(self, x)
        x, c = hidden_states, encoder_hidden_states
        shift, scale, gate, shift2, scale2, gate2 = self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)
        ctx = self.norm1_context
        cshift, cscale, cgate, cshift2, cscale2, cgate2 = ctx.linear(ctx.silu(temb)).chunk(6, dim=1)
        streams = [
            fused.modulate(c, cshift, cscale, ctx.norm.eps),
            fused.modulate(x, shift, scale, self.norm1.norm.eps),
        ]
        out = _attention(self.attn, streams, image_rotary_emb)
        text = c.shape[1]
        x = fused.gated_add(x, gate, self.attn.to_out[0](out[:, text:]))
        c = fused.gated_add(c, cgate, self.attn.to_add_out(out[:, :text]))
        x = fused.last_add(
            self, x, gate2, fused.feed_forward(self.ff, fused.modulate(x, shift2, scale2, self.norm2.eps))
        )
        c = fused.gated_add(
            c,
            cgate2,
            fused.feed_forward(self.ff_context, fused.modulate(c, cshift2, cscale2, self.norm2_context.eps)),
        )
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return c, x


class FusedFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """Flux's single-stream block (text and image tokens as one sequence), fused; its output
    projection reads the attention and MLP halves where they are instead of joining them."""

    adds_residual = True  # fused.adding_residuals

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_rotary_emb is None or joint_attention_kwargs:
            c, x = super().forward(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
            return c, fused.plus_residual(self, x)
        text = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        n = fused.modulate(h, shift, scale, self.norm.norm.eps)
        if type(self.act_mlp) is nn.GELU and self.act_mlp.approximate == "tanh":
            mlp = fused.linear_gelu(self.proj_mlp, n)
        else:
            mlp = self.act_mlp(self.proj_mlp(n))
        attn = _attention(self.attn, [n], image_rotary_emb)
        dim = attn.shape[-1]
        if type(self.proj_out) is nn.Linear:
            w = self.proj_out.weight
            y = F.linear(mlp, w[:, dim:], self.proj_out.bias)  # the MLP's columns of the weight, then
            # the attention's, added (in place, which autocast does not convert: y's dtype for all)
            y.view(-1, y.shape[-1]).addmm_(attn.reshape(-1, dim).to(y.dtype), w[:, :dim].t().to(y.dtype))
        else:  # (FP8 weights: one product of the joined halves)
            y = self.proj_out(torch.cat([attn, mlp], dim=2))
        h = fused.last_add(self, h, gate, y)  # (the residual: on the image tokens, the last ones)
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h[:, :text], h[:, text:]


FUSED = {
    FluxTransformerBlock: FusedFluxTransformerBlock,
    FluxSingleTransformerBlock: FusedFluxSingleTransformerBlock,
}


def _fusable(block: nn.Module) -> bool:
    """A stock block: diffusers' attention processor, RMS norms with weights."""
    attn = block.attn
    norms = [getattr(attn, n, None) for n in ("norm_q", "norm_k")]
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        norms += [getattr(attn, n, None) for n in ("norm_added_q", "norm_added_k")]
    return (
        type(attn.processor) is FluxAttnProcessor
        and all(
            isinstance(n, (RMSNorm, nn.RMSNorm)) and n.weight is not None and n.eps is not None for n in norms
        )
        and len({n.eps for n in norms}) == 1
    )


FUSION = fused.BlockFusion(FUSED, _fusable)
#: give each stock Flux block of a network the fused forward (in place); how many
fuse_blocks = FUSION.fuse
#: within: a network's fused Flux blocks run diffusers' own forward
stock_blocks = FUSION.stock
