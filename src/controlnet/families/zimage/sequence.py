"""A Z-Image transformer's forward pass split where its ControlNet reads it (issue 34).

diffusers' ``ZImageTransformer2DModel`` runs in one call: the image latents in 2x2 patches
embedded and refined, the caption embedded and refined, then one sequence of both (each row's
image tokens, then its caption) through the main layers and the final layer. A ControlNet reads
what comes before the main layers and gives residuals to add after some of them; here the pass
is :func:`prepare` (everything before the main layers, as :class:`Sequences`) and :func:`finish`
(the main layers with the residuals, the final layer, the latents back), built from the
transformer's own modules and helpers, so the base's work is done once and shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZImageTransformer2DModel
from torch import nn

__all__ = ["PATCH", "Sequences", "finish", "patch_tokens", "prepare", "unify"]

#: Z-Image's patch: 2x2 pixels of latents, one frame (the key of its embedders and final layer)
PATCH = (2, 1)
_KEY = f"{PATCH[0]}-{PATCH[1]}"


@dataclass
class Sequences:
    """What the base computed for a batch before its main layers, which the ControlNet reads:
    the image tokens as embedded (``x_in``: pad tokens placed) and as refined (``x``), the
    caption as refined, the joint sequence, each with its rotary frequencies and attention mask
    (None where no row is padded), per-row lengths, the timestep embedding (``adaln``) and the
    transformer (its noise refiner, pad token and layers)."""

    transformer: ZImageTransformer2DModel
    x_in: torch.Tensor
    x: torch.Tensor
    x_freqs: torch.Tensor
    x_mask: Any
    x_lens: list[int]
    x_pad: torch.Tensor  # (total image tokens,) True at pad positions, rows joined
    cap: torch.Tensor
    cap_freqs: torch.Tensor
    cap_lens: list[int]
    unified: torch.Tensor
    unified_freqs: torch.Tensor
    unified_mask: Any
    adaln: torch.Tensor


def unify(x: torch.Tensor, cap: torch.Tensor, x_lens: Sequence[int], cap_lens: Sequence[int]) -> torch.Tensor:
    """Each row's image tokens then its caption tokens, the rows padded with zeros to the longest."""
    rows = [torch.cat([x[i, :n], cap[i, :m]]) for i, (n, m) in enumerate(zip(x_lens, cap_lens))]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0.0)


def patch_tokens(transformer: ZImageTransformer2DModel, latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Latents (C, frames, h, w) each as the transformer's patch tokens, padded as it pads them
    (the last token repeated to a multiple of 32), stacked: (B, tokens, patch channels)."""
    rows = []
    for z in latents:
        tokens = transformer._patchify_image(z, *PATCH)[0]
        rows.append(torch.cat([tokens, tokens[-1:].expand((-len(tokens)) % SEQ_MULTI_OF, -1)]))
    return torch.stack(rows)


def prepare(
    transformer: ZImageTransformer2DModel,
    latents: Sequence[torch.Tensor],
    t: torch.Tensor,
    captions: Sequence[torch.Tensor],
) -> tuple[Sequences, list[tuple[int, int, int]]]:
    """Everything before the main layers for images ``latents`` (each (C, 1, h, w), one size) at
    timesteps ``t`` (the transformer's 0 = noise .. 1 = clean) with ``captions`` (each (tokens,
    text width), lengths free); and the images' sizes for :func:`finish`."""
    tr = transformer
    device = latents[0].device
    adaln = tr.t_embedder(t * tr.t_scale).type_as(latents[0])
    x, cap, sizes, x_pos, cap_pos, x_pad, cap_pad = tr.patchify_and_embed(
        list(latents), list(captions), *PATCH
    )
    x_lens, cap_lens = [len(v) for v in x], [len(v) for v in cap]
    if len(set(x_lens)) != 1:
        raise ValueError("the images of a batch must have one size")
    embedded = tr.all_x_embedder[_KEY](torch.cat(x)).split(x_lens)
    x_in, x_freqs, x_mask, _, _ = tr._prepare_sequence(
        list(embedded), x_pos, x_pad, tr.x_pad_token, None, device
    )
    refined = x_in
    for layer in tr.noise_refiner:
        refined = layer(refined, x_mask, x_freqs, adaln)
    words = tr.cap_embedder(torch.cat(cap)).split(cap_lens)
    cap_seq, cap_freqs, cap_mask, _, _ = tr._prepare_sequence(
        list(words), cap_pos, cap_pad, tr.cap_pad_token, None, device
    )
    for layer in tr.context_refiner:
        cap_seq = layer(cap_seq, cap_mask, cap_freqs)
    unified, unified_freqs, unified_mask, _ = tr._build_unified_sequence(
        refined,
        x_freqs,
        x_lens,
        None,
        cap_seq,
        cap_freqs,
        cap_lens,
        None,
        None,
        None,
        None,
        None,
        False,
        device,
    )
    s = Sequences(
        tr,
        x_in,
        refined,
        x_freqs,
        x_mask,
        x_lens,
        torch.cat(x_pad),
        cap_seq,
        cap_freqs,
        cap_lens,
        unified,
        unified_freqs,
        unified_mask,
        adaln,
    )
    return s, sizes


def finish(
    s: Sequences, sizes: list[tuple[int, int, int]], residuals: Mapping[int, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """The main layers, each residual added after the layer it is for, the final layer, and the
    transformer's output for each image (C, 1, h, w)."""
    tr = s.transformer
    u = s.unified
    for i, layer in enumerate(tr.layers):
        u = layer(u, s.unified_mask, s.unified_freqs, s.adaln)
        if residuals is not None and i in residuals:
            u = u + residuals[i]
    u = tr.all_final_layer[_KEY](u, c=s.adaln)
    return tr.unpatchify(list(u.unbind(0)), sizes, *PATCH)
