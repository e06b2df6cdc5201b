"""Z-Image's transformer block with its elementwise work fused (:mod:`controlnet.model.fused`):
the arithmetic of diffusers' ``ZImageTransformerBlock`` - RMS pre-norms scaled per sample, q/k
RMS norms and the rotary embedding (diffusers turns each to complex numbers in float32), the
tanh-gated RMS post-norms and residual additions, the SiLU-gated feed-forward - modules and keys
unchanged, in fewer kernels. Blocks without modulation (the caption refiner), with per-token
modulation (the omni form) or another attention processor keep diffusers' forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_z_image import (
    ZImageTransformerBlock,
    ZSingleStreamAttnProcessor,
)
from torch import nn

from ...model import fused

__all__ = ["FusedZImageBlock", "fuse_blocks", "stock_blocks"]


def attention(
    attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor
) -> torch.Tensor:
    """Self-attention over ``x`` (B, L, C) with q/k RMS norms and the rotary embedding ``freqs``
    (B, L, D/2, complex: each sample its positions), through the output projection."""
    q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    cos, sin = (part.repeat_interleave(2, dim=-1) for part in (freqs.real, freqs.imag))
    norms = (attn.norm_q, attn.norm_k)
    eps = 0.0 if norms[0] is None else norms[0].eps
    q, k = (
        fused.queries((t,), None if n is None else (n.weight,), eps, cos, sin) for t, n in zip((q, k), norms)
    )
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, fused.values((v,)), attn_mask=mask)
    return attn.to_out[0](out.transpose(1, 2).flatten(2))


class FusedZImageBlock(ZImageTransformerBlock):
    """Z-Image's single-stream block (image, caption or both: one sequence), fused."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
        adaln_noisy: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.modulation or noise_mask is not None:
            return super().forward(x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        eps = self.attention_norm1.eps
        h = fused.rms_modulate(x, self.attention_norm1.weight, scale_msa, eps)
        x = fused.gated_rms_add(x, gate_msa, attention(self.attention, h, attn_mask, freqs_cis),
                                self.attention_norm2.weight, eps)  # fmt: skip
        h = fused.rms_modulate(x, self.ffn_norm1.weight, scale_mlp, eps)
        ff = self.feed_forward
        return fused.gated_rms_add(
            x, gate_mlp, ff.w2(fused.silu_gate(ff.w1(h), ff.w3(h))), self.ffn_norm2.weight, eps
        )


def _fusable(block: Any) -> bool:
    """A stock block: diffusers' attention processor, the norms' weights present."""
    norms = (block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2)
    return type(block.attention.processor) is ZSingleStreamAttnProcessor and all(
        n.weight is not None and n.eps == norms[0].eps for n in norms
    )


FUSION = fused.BlockFusion({ZImageTransformerBlock: FusedZImageBlock}, _fusable)
#: give each stock Z-Image block of a network the fused forward (in place); how many
fuse_blocks = FUSION.fuse
#: within: a network's fused Z-Image blocks run diffusers' own forward
stock_blocks = FUSION.stock
