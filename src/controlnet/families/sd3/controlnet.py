"""The SD3 / SD3.5 ControlNet: the paper's controlled copy of the first MMDiT blocks.

The locked base is diffusers' ``SD3Transformer2DModel`` (joint blocks: image and text tokens with
weights of their own, attending together). The ControlNet is our own code on
:class:`~controlnet.model.zero.ControlledCopy`:

    r_i = Z_out_i( F_copy(x + Z_in(c))_i )

- ``x``: the latents as patch tokens with their positions (``pos_embed``, a copy of the base's;
  SD3.5 Large's ControlNets have none and take the tokens the base's own embedder made);
- ``c``: the condition's VAE latents (with extra channels for inpainting models) through
  ``pos_embed_input``, a zero-initialised patch embedding (Z_in);
- F_copy: copies of the time/text embedders and of the first ``num_layers`` joint blocks (SD3.5
  Large's ControlNets: blocks that read no text, ``SD3SingleTransformerBlock``); its outputs are
  each block's image tokens;
- Z_out_i: a zero-initialised Linear per block (``controlnet_blocks``).

The base adds residual i to joint block j's image tokens when ``int(j / (N / n)) == i``. The
attribute names are the published files' keys (Stability AI's, InstantX's, diffusers'), so a
state dict loads as is; a fresh ControlNet leaves the base's output bit for bit unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock
from torch import nn

from ...model.zero import ControlledCopy, zero_linear, zero_module
from ..dit import copy_twins, in_precision, shared_fields
from .fused import fuse_blocks

__all__ = ["SD3_FIELDS", "SD3ControlNet", "SD3ControlNetConfig"]

#: The base transformer's config fields a ControlNet shares (diffusers' names).
SD3_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)
_DEFAULTS: dict[str, Any] = {  # diffusers' SD3Transformer2DModel defaults, for fields a config omits
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}


@dataclass(frozen=True)
class SD3ControlNetConfig:
    """How many joint blocks are copied; extra condition channels (inpainting: the mask); whether
    the ControlNet embeds the latents itself (``own_pos_embed``) and reads the text
    (``reads_text``: False for SD3.5 Large's ControlNets, whose blocks read no text); whether it
    reads zeros for the pooled text (``zero_pooled``: diffusers' ``force_zeros_for_pooled_projection``,
    true for the published SD3 ControlNets)."""

    num_layers: int = 12
    extra_conditioning_channels: int = 0
    own_pos_embed: bool = True
    reads_text: bool = True
    zero_pooled: bool = True  # the pooled text embedding it reads is zeros (as it was trained)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"an SD3 ControlNet copies at least one block, got num_layers={self.num_layers}")
        if self.extra_conditioning_channels < 0:
            raise ValueError(
                f"extra_conditioning_channels must be >= 0, got {self.extra_conditioning_channels}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SD3ControlNetConfig:
        names = ("num_layers", "extra_conditioning_channels", "own_pos_embed", "reads_text", "zero_pooled")
        return cls(**{k: d[k] for k in names if k in d})


#: SD3's repeated blocks (the units the fast path compiles)
SD3_BLOCKS = (JointTransformerBlock, SD3SingleTransformerBlock)


class SD3ControlNet(ControlledCopy):
    """A trainable copy of an SD3 transformer's first joint blocks with zero-initialised connections."""

    compile_regions = SD3_BLOCKS

    def __init__(
        self,
        transformer_config: Mapping[str, Any],
        config: SD3ControlNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or SD3ControlNetConfig()
        self.config = config
        self.transformer_config = shared_fields(transformer_config, SD3_FIELDS)
        t = {**_DEFAULTS, **self.transformer_config}
        heads, dim = int(t["num_attention_heads"]), int(t["attention_head_dim"])
        inner = heads * dim
        patch = {
            "height": t["sample_size"],
            "width": t["sample_size"],
            "patch_size": t["patch_size"],
            "embed_dim": inner,
        }
        with torch.device(device or "cpu"):
            if config.own_pos_embed:
                self.pos_embed = PatchEmbed(
                    **patch, in_channels=t["in_channels"], pos_embed_max_size=t["pos_embed_max_size"]
                )
            self.time_text_embed = CombinedTimestepTextProjEmbeddings(
                embedding_dim=inner, pooled_projection_dim=t["pooled_projection_dim"]
            )
            if config.reads_text:
                self.context_embedder = nn.Linear(t["joint_attention_dim"], t["caption_projection_dim"])
                dual = set(t["dual_attention_layers"] or ())
                blocks: list[nn.Module] = [
                    JointTransformerBlock(
                        dim=inner,
                        num_attention_heads=heads,
                        attention_head_dim=dim,
                        context_pre_only=False,
                        qk_norm=t["qk_norm"],
                        use_dual_attention=i in dual,
                    )
                    for i in range(config.num_layers)
                ]
            else:
                blocks = [
                    SD3SingleTransformerBlock(dim=inner, num_attention_heads=heads, attention_head_dim=dim)
                    for _ in range(config.num_layers)
                ]
            self.transformer_blocks = nn.ModuleList(blocks)
            fuse_blocks(self.transformer_blocks)  # the same arithmetic in fewer kernels (fused.py)
            self.controlnet_blocks = nn.ModuleList(
                [zero_linear(inner, inner) for _ in range(config.num_layers)]
            )
            self.pos_embed_input = zero_module(
                PatchEmbed(
                    **patch,
                    in_channels=t["in_channels"] + config.extra_conditioning_channels,
                    pos_embed_type=None,
                )
            )

    @property
    def num_residuals(self) -> int:
        return self.config.num_layers

    @property
    def mask_channels(self) -> int:
        """Channels of the inpainting mask the condition carries beside its latents (0: none)."""
        return self.config.extra_conditioning_channels

    @classmethod
    def from_transformer(
        cls, transformer: SD3Transformer2DModel, config: SD3ControlNetConfig | None = None
    ) -> SD3ControlNet:
        """A fresh ControlNet for ``transformer``: embedders and first joint blocks copied exactly,
        the condition's embedding and every output layer zero."""
        config = config or SD3ControlNetConfig()
        if not config.reads_text:
            raise ValueError(
                "a fresh SD3 ControlNet copies joint blocks, which read the text (reads_text=True)"
            )
        have = len(transformer.transformer_blocks)
        if config.num_layers > have:
            raise ValueError(f"cannot copy {config.num_layers} blocks of a transformer that has {have}")
        cn = cls(dict(transformer.config), config)
        copy_twins(cn, transformer)
        return cn

    # -------------------------------------------------------------------- the controlled copy
    def condition_layer(self) -> nn.Module:
        return self.pos_embed_input

    def output_layers(self) -> list[nn.Module]:
        return list(self.controlnet_blocks)

    def copy_forward(
        self, h: torch.Tensor, text: torch.Tensor | None, temb: torch.Tensor
    ) -> list[torch.Tensor]:
        outputs = []
        for block in self.transformer_blocks:
            if text is not None:
                text, h = block(hidden_states=h, encoder_hidden_states=text, temb=temb)
            else:
                h = block(h, temb)
            outputs.append(h)
        return outputs

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        *,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """One residual per copied block. ``hidden_states``: latents (B, C, h, w), or for a
        ControlNet without its own ``pos_embed`` the base's patch tokens; ``condition``: the
        condition's latents (B, C + extra, h, w); ``timestep`` as the base takes it (0-1000)."""
        given = hidden_states.dtype
        hidden_states, condition, pooled_projections, encoder_hidden_states = in_precision(
            self.time_text_embed.timestep_embedder.linear_1.weight.dtype,
            hidden_states,
            condition,
            pooled_projections,
            encoder_hidden_states,
        )
        if self.config.own_pos_embed:
            x = self.pos_embed(hidden_states)
        elif hidden_states.ndim != 3:
            raise ValueError("this ControlNet reads the base's patch tokens (B, L, C), not latents")
        else:
            x = hidden_states
        if self.config.zero_pooled:
            pooled_projections = torch.zeros_like(pooled_projections)
        temb = self.time_text_embed(timestep, pooled_projections)
        text = self.context_embedder(encoder_hidden_states) if self.config.reads_text else None
        res = list(in_precision(given, *self.residuals(x, self.embed_condition(condition), text, temb)))
        return res if scale == 1.0 else [r * scale for r in res]
