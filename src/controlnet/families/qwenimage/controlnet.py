"""The Qwen-Image ControlNet: the paper's controlled copy of the first MMDiT blocks (issue 34).

The locked base is diffusers' ``QwenImageTransformer2DModel`` (60 double-stream blocks: image
and text tokens with weights of their own, attending together under 3-axis rotary positions; text
from Qwen2.5-VL). The ControlNet is our own code on :class:`~controlnet.model.zero.ControlledCopy`:

    r_i = Z_out_i( F_copy(x + Z_in(c))_i )

- ``x``: the packed latent tokens through ``img_in`` (a copy of the base's);
- ``c``: the condition's packed VAE latents (with extra channels for the inpainting ControlNet:
  the mask beside the masked image's latents) through ``controlnet_x_embedder``, a
  zero-initialised Linear (Z_in);
- F_copy: copies of the time embedder, the text norm and projection and the first ``num_layers``
  blocks; its outputs are each block's image tokens;
- Z_out_i: a zero-initialised Linear per block (``controlnet_blocks``).

The base adds residual i to block j's image tokens when ``j // ceil(N / n) == i``. The attribute
names are the published files' keys (InstantX's, diffusers'), so a state dict loads as is; a
fresh ControlNet leaves the base's output bit for bit unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import (
    QwenEmbedRope,
    QwenImageTransformerBlock,
    QwenTimestepProjEmbeddings,
    compute_text_seq_len_from_mask,
)
from torch import nn

from ...model.zero import ControlledCopy, zero_linear
from ..dit import copy_twins, in_precision, shared_fields
from .fused import fuse_blocks

__all__ = ["QWEN_FIELDS", "QwenImageControlNet", "QwenImageControlNetConfig"]

#: The base transformer's config fields a ControlNet shares (diffusers' names).
QWEN_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "axes_dims_rope",
)
_DEFAULTS: dict[str, Any] = {  # diffusers' QwenImageTransformer2DModel defaults
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "axes_dims_rope": (16, 56, 56),
}


@dataclass(frozen=True)
class QwenImageControlNetConfig:
    """How many blocks are copied (the published Union ControlNet: 5), and the extra condition
    channels of the inpainting ControlNet (the mask, packed beside the latents)."""

    num_layers: int = 5
    extra_condition_channels: int = 0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(
                f"a Qwen-Image ControlNet copies at least one block, got num_layers={self.num_layers}"
            )
        if self.extra_condition_channels < 0:
            raise ValueError(f"extra_condition_channels must be >= 0, got {self.extra_condition_channels}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QwenImageControlNetConfig:
        return cls(**{k: d[k] for k in ("num_layers", "extra_condition_channels") if k in d})


class QwenImageControlNet(ControlledCopy):
    """A trainable copy of a Qwen-Image transformer's first blocks with zero-initialised connections."""

    compile_regions = (QwenImageTransformerBlock,)

    def __init__(
        self,
        transformer_config: Mapping[str, Any],
        config: QwenImageControlNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or QwenImageControlNetConfig()
        self.config = config
        self.transformer_config = shared_fields(transformer_config, QWEN_FIELDS)
        t = {**_DEFAULTS, **self.transformer_config}
        heads, dim = int(t["num_attention_heads"]), int(t["attention_head_dim"])
        inner = heads * dim
        # rotary frequencies, computed when built (no weights): on the CPU even for a meta build
        self.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(t["axes_dims_rope"]), scale_rope=True)
        with torch.device(device or "cpu"):
            self.time_text_embed = QwenTimestepProjEmbeddings(embedding_dim=inner)
            self.txt_norm = RMSNorm(t["joint_attention_dim"], eps=1e-6)
            self.img_in = nn.Linear(t["in_channels"], inner)
            self.txt_in = nn.Linear(t["joint_attention_dim"], inner)
            self.transformer_blocks = nn.ModuleList(
                [
                    QwenImageTransformerBlock(dim=inner, num_attention_heads=heads, attention_head_dim=dim)
                    for _ in range(config.num_layers)
                ]
            )
            self.controlnet_blocks = nn.ModuleList(
                [zero_linear(inner, inner) for _ in range(config.num_layers)]
            )
            self.controlnet_x_embedder = zero_linear(
                t["in_channels"] + config.extra_condition_channels, inner
            )
        fuse_blocks(self.transformer_blocks)  # the same arithmetic in fewer kernels (fused.py)

    @property
    def num_residuals(self) -> int:
        return self.config.num_layers

    @property
    def mask_channels(self) -> int:
        """Channels of the inpainting mask the condition carries beside its latents (0: none);
        ``extra_condition_channels`` counts them packed, four per mask channel."""
        return self.config.extra_condition_channels // 4

    @classmethod
    def from_transformer(
        cls, transformer: QwenImageTransformer2DModel, config: QwenImageControlNetConfig | None = None
    ) -> QwenImageControlNet:
        """A fresh ControlNet for ``transformer``: embedders and first blocks copied exactly, the
        condition's embedding and every output layer zero."""
        config = config or QwenImageControlNetConfig()
        have = len(transformer.transformer_blocks)
        if config.num_layers > have:
            raise ValueError(f"cannot copy {config.num_layers} blocks of a transformer that has {have}")
        cn = cls(dict(transformer.config), config)
        copy_twins(cn, transformer)
        return cn

    # -------------------------------------------------------------------- the controlled copy
    def condition_layer(self) -> nn.Module:
        return self.controlnet_x_embedder

    def output_layers(self) -> list[nn.Module]:
        return list(self.controlnet_blocks)

    def copy_forward(
        self,
        h: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        temb: torch.Tensor,
        rotary: Any,
    ) -> list[torch.Tensor]:
        outputs = []
        for block in self.transformer_blocks:
            text, h = block(
                hidden_states=h,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=text_mask,
                temb=temb,
                image_rotary_emb=rotary,
            )
            outputs.append(h)
        return outputs

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        *,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: Sequence[Any],
        encoder_hidden_states_mask: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """One residual per copied block. ``hidden_states``: the packed latent tokens (B, L, C);
        ``condition``: the condition's packed latents (B, L, C + extra); ``timestep`` in [0, 1]
        as the base takes it; ``img_shapes``: each sample's (frames, h / 2, w / 2) for the rotary
        positions; ``encoder_hidden_states_mask``: 1 for the text tokens to attend to."""
        given = hidden_states.dtype
        hidden_states, condition, encoder_hidden_states = in_precision(
            self.img_in.weight.dtype, hidden_states, condition, encoder_hidden_states
        )
        x = self.img_in(hidden_states)
        cond = self.embed_condition(condition)
        temb = self.time_text_embed(timestep, x + cond)
        length, _, mask = compute_text_seq_len_from_mask(encoder_hidden_states, encoder_hidden_states_mask)
        rotary = self.pos_embed(img_shapes, max_txt_seq_len=length, device=x.device)
        text = self.txt_in(self.txt_norm(encoder_hidden_states))
        res = list(in_precision(given, *self.residuals(x, cond, text, mask, temb, rotary)))
        return res if scale == 1.0 else [r * scale for r in res]
