"""Union ControlNets for SDXL (xinsir's ControlNet++ Union and ProMax; diffusers'
``ControlNetUnionModel``): one network for many kinds of condition, several at once.

It is the controlled copy of :class:`~controlnet.families.sd.controlnet.ControlNet` with one
difference in what enters the copy: each condition goes through the shared hint encoder; its mean
feature plus its kind's learned task embedding is a token; with one more token for the noisy
latents' mean, a small transformer mixes them, and each condition adds its hint features plus its
token's zero-initialised projection to the copy's input. The kinds in use, as a multi-hot vector
through sinusoidal and MLP embeddings, are added to the time embedding.

Several conditions of one Union ControlNet run in one pass, each scaled by its own strength inside
the network (and the residuals not scaled again); one condition alone has its residuals scaled, as
a plain ControlNet's are. Names and keys are diffusers' (its ``transformer_layes`` spelling
included), so published files load as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ...model.zero import zero_module
from .controlnet import ControlNet, ControlNetConfig
from .halves import embed_time

__all__ = ["XINSIR_TYPES", "UnionConfig", "UnionControlNet"]

#: xinsir's names for the kinds of condition, by mode number (the first name is the one shown; the
#: others are the annotators the model was trained with for that mode). ControlNet++ Union knows
#: 0-5; ProMax adds tile (6: deblur, variation, super-resolution) and repaint (7: inpainting and
#: outpainting, the condition being the image with the pixels to paint set to 0).
XINSIR_TYPES: dict[int, tuple[str, ...]] = {
    0: ("openpose", "pose"),
    1: ("depth",),
    2: ("softedge", "hed", "pidi", "scribble", "ted"),
    3: ("canny", "lineart", "anime_lineart", "mlsd"),
    4: ("normal",),
    5: ("segment", "seg"),
    6: ("tile",),
    7: ("repaint", "inpaint", "outpaint"),
}


@dataclass
class UnionConfig:
    """diffusers' ControlNetUnionModel fields beyond a ControlNet's."""

    num_control_type: int = 6
    num_trans_channel: int = 320
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnionConfig:
        return cls(**{k: int(d[k]) for k in asdict(cls()) if k in d})


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, d * 4)
        self.gelu = _QuickGELU()
        self.c_proj = nn.Linear(d * 4, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _MixingLayer(nn.Module):
    """A pre-norm transformer layer (CLIP's), over the condition tokens."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = _Mlp(d)
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, channels) given to a sequence-first attention, as the published model
        # was trained: it attends across the batch rows, per token. Kept exactly.
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class UnionControlNet(ControlNet):
    """An SDXL Union ControlNet (see the module's doc)."""

    def __init__(
        self,
        unet: Any,
        config: ControlNetConfig | None = None,
        union: UnionConfig | None = None,
    ) -> None:
        super().__init__(unet, config)
        u = self.union = union or UnionConfig()
        ref = unet.conv_in.weight
        time_dim = self.time_embedding.linear_2.out_features
        add_dim = int(self.unet_config.get("addition_time_embed_dim") or 256)
        with torch.device(ref.device):
            self.task_embedding = nn.Parameter(
                u.num_trans_channel**0.5 * torch.randn(u.num_control_type, u.num_trans_channel)
            )
            self.transformer_layes = nn.ModuleList(
                [_MixingLayer(u.num_trans_channel, u.num_trans_head) for _ in range(u.num_trans_layer)]
            )
            self.spatial_ch_projs = zero_module(nn.Linear(u.num_trans_channel, u.num_proj_channel))
            self.control_type_proj = copy.deepcopy(self.add_time_proj) or Timesteps(add_dim, True, 0)
            self.control_add_embedding = TimestepEmbedding(add_dim * u.num_control_type, time_dim)
        for m in (self.transformer_layes, self.spatial_ch_projs, self.control_add_embedding):
            m.to(ref.dtype)
        self.task_embedding.data = self.task_embedding.data.to(ref.dtype)

    @classmethod
    def from_unet(  # type: ignore[override]
        cls, unet: Any, config: ControlNetConfig | None = None, union: UnionConfig | None = None
    ) -> UnionControlNet:
        return cls(unet, config, union)

    @property
    def num_mode(self) -> int:
        return self.union.num_control_type

    @property
    def mode_names(self) -> dict[int, tuple[str, ...]]:
        """xinsir's names for the modes, for a model of xinsir's size (6 kinds, or ProMax's 8); a
        Union ControlNet of another size has numbers only."""
        n = self.union.num_control_type
        return {m: names for m, names in XINSIR_TYPES.items() if m < n} if n in (6, 8) else {}

    def check_types(self, types: Sequence[int]) -> None:
        bad = [t for t in types if not 0 <= t < self.union.num_control_type]
        if bad:
            raise ValueError(
                f"control type {bad[0]}: this Union ControlNet knows 0-{self.union.num_control_type - 1}"
            )

    def forward_union(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hints: Sequence[torch.Tensor],
        types: Sequence[int],
        scales: Sequence[float],
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for several conditions at once: ``hints`` from :meth:`encode_hint`, each of
        kind ``types[i]`` with strength ``scales[i]`` (one condition: the residuals scaled by it;
        several: each condition scaled inside, the residuals as they come)."""
        self.check_types(types)
        dtype = self.dtype
        sample, encoder_hidden_states = sample.to(dtype), encoder_hidden_states.to(dtype)
        if added_cond_kwargs:
            added_cond_kwargs = {
                k: v.to(dtype) if v.is_floating_point() else v for k, v in added_cond_kwargs.items()
            }
        b = sample.shape[0]
        emb = embed_time(self, sample, timestep, added_cond_kwargs)
        # the multi-hot vector from comparisons with numbers: no host-to-device copy, which a
        # CUDA graph's capture refuses
        ids = torch.arange(self.union.num_control_type, device=sample.device)
        kinds = torch.zeros(self.union.num_control_type, device=sample.device)
        for kind in types:
            kinds = torch.maximum(kinds, (ids == kind).float())
        kind_emb = self.control_type_proj(kinds.expand(b, -1).flatten()).reshape(b, -1).to(emb.dtype)
        emb = emb + self.control_add_embedding(kind_emb)
        h = self.conv_in(sample)
        one = len(hints) == 1
        tokens, features = [], []
        for hint, kind, scale in zip(hints, types, scales):
            hint = hint.to(dtype).expand(b, *hint.shape[1:])
            token = hint.mean(dim=(2, 3)) + self.task_embedding[kind]
            tokens.append(token[:, None] if one else token[:, None] * scale)
            features.append(hint if one else hint * scale)
        tokens.append(h.mean(dim=(2, 3))[:, None])
        x = torch.cat(tokens, dim=1)
        for layer in self.transformer_layes:
            x = layer(x)
        condition = torch.zeros_like(h)
        for i, (feature, scale) in enumerate(zip(features, scales)):
            alpha = self.spatial_ch_projs(x[:, i])[:, :, None, None]
            condition = condition + feature + (alpha if one else alpha * scale)
        out = self.residuals(h, condition, emb, encoder_hidden_states, None)
        return [r * scales[0] for r in out] if one else out
