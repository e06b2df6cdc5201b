"""Qwen-Image's transformer block with its elementwise work fused (:mod:`controlnet.model.fused`):
the arithmetic of diffusers' ``QwenImageTransformerBlock`` - a double-stream block like Flux's:
each stream's LayerNorm with its modulation, the q/k RMS norms and the rotary embedding (diffusers
turns each to complex numbers in float32), the joint attention (text first), the gates and
residual additions, the tanh-GELU feed-forwards - modules and keys unchanged, in fewer kernels.
Blocks given a text mask, per-token modulation (``zero_cond_t``) or another attention processor
keep diffusers' forward. Within :func:`sharing_step` each block takes its modulation
products once for all the calls of a step (the two halves of true guidance read the same timestep
embedding; the products are bound by reading their weights)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformerBlock,
)
from torch import nn

from ...model import fused

__all__ = ["FusedQwenImageBlock", "fuse_blocks", "sharing_step", "stock_blocks"]


def _table(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of complex rotary frequencies (L, D/2), each (L, D) with pairs interleaved."""
    return freqs.real.repeat_interleave(2, dim=-1), freqs.imag.repeat_interleave(2, dim=-1)


def _rotary_table(
    rotary: tuple[torch.Tensor, torch.Tensor], shared: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) over all tokens, text first, of diffusers' complex frequencies (image's, text's);
    with ``shared`` (:func:`sharing_step`), made once for the blocks that read the same ones."""
    known = None if shared is None else shared.get("freqs")
    if known is not None and all(a is b for a, b in zip(known, rotary)):
        return shared["table"]  # type: ignore[index]
    img_freqs, txt_freqs = rotary
    cos, sin = (torch.cat(parts) for parts in zip(_table(txt_freqs), _table(img_freqs)))
    if shared is not None:
        shared["freqs"], shared["table"] = rotary, (cos, sin)  # (holding them: `is` stays meaningful)
    return cos, sin


class FusedQwenImageBlock(QwenImageTransformerBlock):
    """Qwen-Image's double-stream block (text and image streams, joint attention), fused."""

    adds_residual = True  # fused.adding_residuals

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            encoder_hidden_states_mask is not None
            or image_rotary_emb is None
            or joint_attention_kwargs
            or modulate_index is not None
            or self.zero_cond_t
        ):
            c, x = super().forward(
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                temb,
                image_rotary_emb,
                joint_attention_kwargs,
                modulate_index,
            )
            return c, fused.plus_residual(self, x)
        x, c = hidden_states, encoder_hidden_states
        image_mod, text_mod = self._modulation(temb)
        shift, scale, gate, shift2, scale2, gate2 = image_mod.chunk(6, dim=-1)
        cshift, cscale, cgate, cshift2, cscale2, cgate2 = text_mod.chunk(6, dim=-1)
        image = fused.modulate(x, shift, scale, self.img_norm1.eps)
        text = fused.modulate(c, cshift, cscale, self.txt_norm1.eps)
        cos, sin = _rotary_table(image_rotary_emb, self.__dict__.get("_shared_rotary"))
        out = fused.stream_attention(
            self.attn, [text, image], self.attn.inner_dim // self.attn.heads, cos, sin
        )
        n = c.shape[1]
        x = fused.gated_add(x, gate, self.attn.to_out[0](out[:, n:]))
        c = fused.gated_add(c, cgate, self.attn.to_add_out(out[:, :n]))
        x = fused.last_add(
            self,
            x,
            gate2,
            fused.feed_forward(self.img_mlp, fused.modulate(x, shift2, scale2, self.img_norm2.eps)),
        )
        c = fused.gated_add(
            c,
            cgate2,
            fused.feed_forward(self.txt_mlp, fused.modulate(c, cshift2, cscale2, self.txt_norm2.eps)),
        )
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
            x = x.clip(-65504, 65504)
        return c, x

    def _modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and text streams' modulation products of ``temb`` (B, D); inside
        :func:`sharing_step`, the first call's, for every row of every later call."""
        shared = self.__dict__.get("_shared_modulation")
        if shared:
            return tuple(m[:1].expand(temb.shape[0], -1) for m in shared)  # type: ignore[return-value]
        out = self.img_mod(temb), self.txt_mod(temb)
        if shared is not None:
            shared.extend(out)
        return out


@contextmanager
def sharing_step(network: nn.Module) -> Iterator[None]:
    """Within: each fused Qwen-Image block of ``network`` takes its modulation products once and
    gives them to every row of every later call, and the blocks make the rotary table (cos, sin)
    of one set of frequencies once. For the calls of one denoising step only, whose rows all read
    one timestep embedding (Qwen-Image's reads the timestep alone)."""
    candidates = getattr(network, "transformer_blocks", None) or network.modules()  # not every module
    blocks = [m for m in candidates if isinstance(m, FusedQwenImageBlock)]
    tables: dict[str, Any] = {}
    for block in blocks:
        block.__dict__["_shared_modulation"] = []
        block.__dict__["_shared_rotary"] = tables
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("_shared_modulation", None)
            block.__dict__.pop("_shared_rotary", None)


def _fusable(block: Any) -> bool:
    """A stock block: diffusers' attention processor, q/k RMS norms with weights for both streams."""
    attn = block.attn
    norms = [getattr(attn, n, None) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    return (
        type(attn.processor) is QwenDoubleStreamAttnProcessor2_0
        and all(n is not None and getattr(n, "weight", None) is not None for n in norms)
        and len({n.eps for n in norms}) == 1  # type: ignore[union-attr]
    )


FUSION = fused.BlockFusion({QwenImageTransformerBlock: FusedQwenImageBlock}, _fusable)
#: give each stock Qwen-Image block of a network the fused forward (in place); how many
fuse_blocks = FUSION.fuse
#: within: a network's fused Qwen-Image blocks run diffusers' own forward
stock_blocks = FUSION.stock
