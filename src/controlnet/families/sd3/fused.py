"""SD3's transformer blocks with their elementwise work fused (:mod:`controlnet.model.fused`):
the arithmetic of diffusers' ``JointTransformerBlock`` (SD3 and SD3.5: query-key norms, the
dual attention of SD3.5 medium, the last block's text-only input) and ``SD3SingleTransformerBlock``
(SD3.5 Large ControlNets), modules and keys unchanged, in fewer kernels. Blocks with another
attention processor or feed-forward chunking keep diffusers' forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock
from torch import nn

from ...model import fused

__all__ = ["FusedJointTransformerBlock", "FusedSD3SingleTransformerBlock", "fuse_blocks", "stock_blocks"]


def _weights(*norms: nn.Module | None) -> tuple[torch.Tensor, ...] | None:
    return None if norms[0] is None else tuple(n.weight for n in norms)  # type: ignore[union-attr]


def _attention(attn: nn.Module, image: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """Attention over the image tokens (and the text's, after them: their own projections and
    norms), output (B, L, H * D) over all tokens, image first."""
    d = attn.to_q.out_features // attn.heads
    q, k, v = (
        [attn.to_q(image).unflatten(-1, (-1, d))],
        [attn.to_k(image).unflatten(-1, (-1, d))],
        [attn.to_v(image).unflatten(-1, (-1, d))],
    )
    qn, kn = [attn.norm_q], [attn.norm_k]
    if text is not None:
        q.append(attn.add_q_proj(text).unflatten(-1, (-1, d)))
        k.append(attn.add_k_proj(text).unflatten(-1, (-1, d)))
        v.append(attn.add_v_proj(text).unflatten(-1, (-1, d)))
        qn.append(attn.norm_added_q)
        kn.append(attn.norm_added_k)
    eps = 0.0 if attn.norm_q is None else attn.norm_q.eps
    out = F.scaled_dot_product_attention(
        fused.queries(tuple(q), _weights(*qn), eps, None, None),
        fused.queries(tuple(k), _weights(*kn), eps, None, None),
        fused.values(tuple(v)),
    )
    return out.transpose(1, 2).flatten(2)


class FusedJointTransformerBlock(JointTransformerBlock):
    """SD3's joint block (image and text streams, joint attention), fused."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if joint_attention_kwargs or self._chunk_size is not None:
            return super().forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        x, c = hidden_states, encoder_hidden_states
        emb = self.norm1.linear(self.norm1.silu(temb))
        eps = self.norm1.norm.eps
        if self.use_dual_attention:
            shift, scale, gate, shift2, scale2, gate2, shift_b, scale_b, gate_b = emb.chunk(9, dim=1)
        else:
            shift, scale, gate, shift2, scale2, gate2 = emb.chunk(6, dim=1)
        ctx = self.norm1_context
        if self.context_pre_only:
            cscale, cshift = ctx.linear(ctx.silu(temb).to(c.dtype)).chunk(2, dim=1)
        else:
            cshift, cscale, cgate, cshift2, cscale2, cgate2 = ctx.linear(ctx.silu(temb)).chunk(6, dim=1)
        nx = fused.modulate(x, shift, scale, eps)
        out = _attention(self.attn, nx, fused.modulate(c, cshift, cscale, ctx.norm.eps))
        n = x.shape[1]
        if self.use_dual_attention:  # a second attention over the image alone, from the block's input
            second = self.attn2.to_out[0](
                _attention(self.attn2, fused.modulate(x, shift_b, scale_b, eps), None)
            )
        x = fused.gated_add(x, gate, self.attn.to_out[0](out[:, :n]))
        if self.use_dual_attention:
            x = fused.gated_add(x, gate_b, second)
        x = fused.gated_add(
            x, gate2, fused.feed_forward(self.ff, fused.modulate(x, shift2, scale2, self.norm2.eps))
        )
        if self.context_pre_only:
            return None, x
        c = fused.gated_add(c, cgate, self.attn.to_add_out(out[:, n:]))
        c = fused.gated_add(
            c,
            cgate2,
            fused.feed_forward(self.ff_context, fused.modulate(c, cshift2, cscale2, self.norm2_context.eps)),
        )
        return c, x


class FusedSD3SingleTransformerBlock(SD3SingleTransformerBlock):
    """The image-only block of SD3.5 Large ControlNets, fused."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        shift, scale, gate, shift2, scale2, gate2 = self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)
        out = _attention(self.attn, fused.modulate(x, shift, scale, self.norm1.norm.eps), None)
        x = fused.gated_add(x, gate, self.attn.to_out[0](out))
        return fused.gated_add(
            x, gate2, fused.feed_forward(self.ff, fused.modulate(x, shift2, scale2, self.norm2.eps))
        )


FUSED = {
    JointTransformerBlock: FusedJointTransformerBlock,
    SD3SingleTransformerBlock: FusedSD3SingleTransformerBlock,
}


def _fusable(block: nn.Module) -> bool:
    """A stock block: diffusers' joint attention processor; query-key norms all RMS norms with
    weights, or none."""
    attns = [block.attn, *([block.attn2] if getattr(block, "attn2", None) is not None else [])]
    for attn in attns:
        if type(attn.processor) is not JointAttnProcessor2_0:
            return False
        names = ["norm_q", "norm_k"] + (
            ["norm_added_q", "norm_added_k"] if getattr(attn, "add_q_proj", None) is not None else []
        )
        norms = [getattr(attn, n, None) for n in names]
        rms = all(isinstance(n, (RMSNorm, nn.RMSNorm)) and n.weight is not None for n in norms)
        if not (rms or all(n is None for n in norms)):
            return False
        if rms and len({n.eps for n in norms}) != 1:
            return False
    return True


FUSION = fused.BlockFusion(FUSED, _fusable)
#: give each stock SD3 block of a network the fused forward (in place); how many
fuse_blocks = FUSION.fuse
#: within: a network's fused SD3 blocks run diffusers' own forward
stock_blocks = FUSION.stock
