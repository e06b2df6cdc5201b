"""The UNet's forward pass in parts: time embedding, encoder, decoder.

A ControlNet's residuals enter the locked UNet only after its encoder and middle block have run:
they are added to the skips and to the middle block's output. So the UNet's encoder half does not
depend on any ControlNet, and on a GPU it can run on its own CUDA stream while the ControlNets run
on others (``controlled_unet_forward(concurrent=True)``); the decoder half then takes both. Run
one after the other, :func:`encoder_half` and :func:`decoder_half` compute exactly what diffusers'
``UNet2DConditionModel.forward`` computes with ``down_block_additional_residuals`` /
``mid_block_additional_residual`` (the same operations in the same order), for the UNets a
ControlNet supports (SD1.x, SD2.x, SDXL).

:func:`embed_time` and :func:`encode` are written against diffusers' attribute names
(``time_proj``, ``time_embedding``, ``down_blocks``, ``mid_block`` ...), which the ControlNet's
trainable copy keeps, so the copy runs its encoder through the same two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

__all__ = ["compile_halves", "decoder_half", "embed_time", "encode", "encoder_half", "halves"]

Features = list[torch.Tensor]


def embed_time(
    m: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    added: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The timestep embedding (plus SDXL's pooled-text and size/crop embedding) of a UNet or its
    ControlNet copy: (B, C) for a batch of B samples."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
    t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
    emb = m.time_embedding(m.time_proj(t).to(sample.dtype))
    if getattr(m, "add_embedding", None) is not None:  # SDXL: pooled text embedding + size/crop ids
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError("this UNet needs added_cond_kwargs with 'text_embeds' and 'time_ids' (SDXL)")
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]
        time_embeds = m.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        emb = emb + m.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    if m.time_embed_act is not None:
        emb = m.time_embed_act(emb)
    return emb


def encode(
    m: nn.Module,
    h: torch.Tensor,
    emb: torch.Tensor,
    context: torch.Tensor,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Features]:
    """Down blocks then the middle block of a UNet or its ControlNet copy, from the input conv's
    output ``h``. Returns the middle block's output and the skips (``h`` first, then each down
    block's outputs), in the order the decoder consumes them from the end."""
    skips = [h]
    for block in m.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(
                hidden_states=h,
                temb=emb,
                encoder_hidden_states=context,
                cross_attention_kwargs=cross_attention_kwargs,
            )
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    if getattr(m.mid_block, "has_cross_attention", False):
        h = m.mid_block(h, emb, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs)
    else:
        h = m.mid_block(h, emb)
    return h, skips


def encoder_half(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    context: torch.Tensor,
    added: Mapping[str, torch.Tensor] | None = None,
) -> Features:
    """``[emb, *skips, middle]``: what the decoder half needs, laid out like a ControlNet's
    residuals after the embedding (the skips in order, the middle block's output last)."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = embed_time(unet, sample, timestep, added)
    h, skips = encode(unet, unet.conv_in(sample), emb, context)
    return [emb, *skips, h]


def decoder_half(
    unet: UNet2DConditionModel,
    features: Sequence[torch.Tensor],
    context: torch.Tensor,
    residuals: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The noise prediction from :func:`encoder_half`'s ``features``, with ControlNet
    ``residuals`` (the skips' first, the middle one last) added as diffusers adds them."""
    emb, *skips, h = features
    if residuals is not None:
        if len(residuals) != len(skips) + 1:
            raise ValueError(f"expected {len(skips) + 1} residuals for this UNet, got {len(residuals)}")
        skips = [s + r for s, r in zip(skips, residuals)]
        h = h + residuals[-1]
    # diffusers passes the skip's size to each upsampler when the input is not a multiple of the
    # overall upsampling factor (otherwise 2x nearest upsampling gives that size anyway)
    factor = 2**unet.num_upsamplers
    forward_size = any(s % factor for s in skips[0].shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(
                hidden_states=h,
                temb=emb,
                res_hidden_states_tuple=res,
                encoder_hidden_states=context,
                upsample_size=size,
            )
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


EncoderFn = Callable[..., Features]
DecoderFn = Callable[..., torch.Tensor]


def halves(unet: UNet2DConditionModel) -> tuple[EncoderFn, DecoderFn]:
    """``unet``'s two halves as ``(encoder(sample, timestep, context, added), decoder(features,
    context, residuals))``: the compiled ones after :func:`compile_halves`."""
    compiled = unet.__dict__.get("_controlnet_halves")
    if compiled is not None:
        return compiled

    def encoder(
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        context: torch.Tensor,
        added: Mapping[str, torch.Tensor] | None = None,
    ) -> Features:
        return encoder_half(unet, sample, timestep, context, added)

    def decoder(
        features: Sequence[torch.Tensor],
        context: torch.Tensor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return decoder_half(unet, features, context, residuals)

    return encoder, decoder


def compile_halves(unet: UNet2DConditionModel, mode: str) -> None:
    """Compile ``unet``'s halves (torch.compile, static shapes) for :func:`halves` to return."""
    if "_controlnet_halves" in unet.__dict__:
        return
    encoder, decoder = halves(unet)
    unet.__dict__["_controlnet_halves"] = (
        torch.compile(encoder, mode=mode, dynamic=False),
        torch.compile(decoder, mode=mode, dynamic=False),
    )
