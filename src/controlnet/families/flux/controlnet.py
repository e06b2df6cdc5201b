"""The Flux.1 ControlNet: the paper's controlled copy of the first transformer blocks.

The locked base is diffusers' ``FluxTransformer2DModel`` (19 double-stream blocks, where text and
image tokens keep their own weights, then 38 single-stream blocks over the joined sequence). The
ControlNet is our own code on :class:`~controlnet.model.zero.ControlledCopy`:

    r_i = Z_out_i( F_copy(x + Z_in(c))_i )

- ``x``: the noisy latent tokens through a copy of the base's ``x_embedder``; ``c``: the
  condition image's VAE latents, packed 2x2 like the base's (64 channels per token), through
  ``controlnet_x_embedder`` (Z_in, a zero-initialised Linear);
- F_copy: copies of the base's time/text embedders and of its first ``num_layers`` double and
  ``num_single_layers`` single blocks; its outputs are each copied block's image tokens;
- Z_out_i: one zero-initialised Linear(inner, inner) per copied block (``controlnet_blocks``,
  ``controlnet_single_blocks``).

The base adds residual i to the output of its double block j when ``j // ceil(19 / n) == i``
(the single blocks likewise), which diffusers' transformer does when given the residuals. A
**Union** ControlNet has ``controlnet_mode_embedder`` (an Embedding of the control modes) whose
token is put before the text tokens, so one network reads several kinds of condition.

The attribute names are the published files' keys (InstantX, Shakker-Labs, diffusers), so a
state dict loads as is. A fresh ControlNet (:meth:`FluxControlNet.from_transformer`) leaves the
base's output bit for bit unchanged: every Z_out is exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
)
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from ...model.hint import HintEncoder
from ...model.zero import ControlledCopy, zero_linear
from ..dit import copy_twins, in_precision, shared_fields
from .fused import fuse_blocks
from .patches import pack

__all__ = ["FLUX_FIELDS", "FLUX_UNION_MODES", "FluxControlNet", "FluxControlNetConfig", "FluxResiduals"]

#: The control modes of InstantX's and Shakker-Labs' Flux Union ControlNets (Union, Union Pro 1;
#: their embedding holds 10 modes, 7 of them trained), by number; the first name is the one shown.
FLUX_UNION_MODES: dict[int, tuple[str, ...]] = {
    0: ("canny",),
    1: ("tile",),
    2: ("depth",),
    3: ("blur",),
    4: ("pose", "openpose"),
    5: ("gray",),
    6: ("lq", "low_quality"),
}

#: The base transformer's config fields a ControlNet shares (diffusers' names).
FLUX_FIELDS = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)


@dataclass(frozen=True)
class FluxControlNetConfig:
    """How much of the base is copied, the Union's number of control modes (None: one kind of
    condition), and how the condition enters: as VAE latents (``pixel_hint_channels`` None: the
    InstantX convention), or as pixels through the paper's hint encoder to that many channels at
    the latents' size (XLabs' convention, whose residuals the base then takes in turn, block j
    the residual j mod n), the hint encoder scaling the image down ``pixel_hint_scale`` times, as
    the base's VAE does (Flux.1's: 8)."""

    num_layers: int = 2
    num_single_layers: int = 0
    num_mode: int | None = None
    pixel_hint_channels: int | None = None
    pixel_hint_scale: int = 8
    extra_condition_channels: int = 0  # inpainting (Alimama's): the packed mask beside the latents

    @property
    def repeats(self) -> bool:
        """The base reads the residuals in turn (block j: residual j mod n), as XLabs' do."""
        return self.pixel_hint_channels is not None

    def __post_init__(self) -> None:
        if self.num_layers < 0 or self.num_single_layers < 0 or self.num_layers + self.num_single_layers == 0:
            raise ValueError(
                f"a Flux ControlNet copies at least one block (num_layers={self.num_layers}, "
                f"num_single_layers={self.num_single_layers})"
            )
        if self.num_mode is not None and self.num_mode < 1:
            raise ValueError(f"num_mode must be >= 1 or None, got {self.num_mode}")
        if self.pixel_hint_channels is not None and self.pixel_hint_channels < 1:
            raise ValueError(f"pixel_hint_channels must be >= 1 or None, got {self.pixel_hint_channels}")
        if self.pixel_hint_scale < 2 or self.pixel_hint_scale & (self.pixel_hint_scale - 1):
            raise ValueError(f"pixel_hint_scale must be a power of two >= 2, got {self.pixel_hint_scale}")

    @property
    def hint_block_channels(self) -> tuple[int, ...]:
        """The hint encoder's widths: 16 throughout, one stride-2 convolution per halving."""
        return (16,) * self.pixel_hint_scale.bit_length()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FluxControlNetConfig:
        names = (
            "num_layers",
            "num_single_layers",
            "num_mode",
            "pixel_hint_channels",
            "pixel_hint_scale",
            "extra_condition_channels",
        )
        return cls(**{k: d[k] for k in names if k in d})


@dataclass
class FluxResiduals:
    """One ControlNet's residuals for the base's double and single blocks (None: none for them)."""

    double: list[torch.Tensor] | None
    single: list[torch.Tensor] | None

    def scaled(self, scale: float) -> FluxResiduals:
        def mul(rs: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if rs is None else [r * scale for r in rs]

        return FluxResiduals(mul(self.double), mul(self.single))


#: Flux's repeated blocks (the units the fast path compiles)
FLUX_BLOCKS = (FluxTransformerBlock, FluxSingleTransformerBlock)


class FluxControlNet(ControlledCopy):
    """A trainable copy of a Flux transformer's first blocks with zero-initialised connections."""

    compile_regions = FLUX_BLOCKS

    def __init__(
        self,
        transformer_config: Mapping[str, Any],
        config: FluxControlNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or FluxControlNetConfig()
        self.config = config
        self.transformer_config = shared_fields(transformer_config, FLUX_FIELDS)
        t = {**_DEFAULTS, **self.transformer_config}
        inner = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
        self.inner_dim = inner
        hint = config.pixel_hint_channels
        if hint is not None and 4 * hint != t["in_channels"]:  # (packed in 2x2 patches, as the latents)
            raise ValueError(
                f"pixel_hint_channels={hint} packs to {4 * hint} features a token, but the base's "
                f"transformer reads {t['in_channels']} (in_channels): use pixel_hint_channels="
                f"{t['in_channels'] // 4}"
            )
        with torch.device(device or "cpu"):
            self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(t["axes_dims_rope"]))
            embed = (
                CombinedTimestepGuidanceTextProjEmbeddings
                if t["guidance_embeds"]
                else CombinedTimestepTextProjEmbeddings
            )
            self.time_text_embed = embed(
                embedding_dim=inner, pooled_projection_dim=t["pooled_projection_dim"]
            )
            self.context_embedder = nn.Linear(t["joint_attention_dim"], inner)
            self.x_embedder = nn.Linear(t["in_channels"], inner)
            heads, dim = int(t["num_attention_heads"]), int(t["attention_head_dim"])
            self.transformer_blocks = nn.ModuleList(
                [
                    FluxTransformerBlock(dim=inner, num_attention_heads=heads, attention_head_dim=dim)
                    for _ in range(config.num_layers)
                ]
            )
            self.single_transformer_blocks = nn.ModuleList(
                [
                    FluxSingleTransformerBlock(dim=inner, num_attention_heads=heads, attention_head_dim=dim)
                    for _ in range(config.num_single_layers)
                ]
            )
            fuse_blocks(self)  # the same arithmetic in fewer kernels (fused.py)
            self.controlnet_blocks = nn.ModuleList(
                [zero_linear(inner, inner) for _ in range(config.num_layers)]
            )
            self.controlnet_single_blocks = nn.ModuleList(
                [zero_linear(inner, inner) for _ in range(config.num_single_layers)]
            )
            if config.pixel_hint_channels is None:
                self.controlnet_x_embedder = zero_linear(
                    t["in_channels"] + config.extra_condition_channels, inner
                )
            else:  # the hint encoder's last conv is the zero layer; its patches are embedded as the latents'
                self.input_hint_block = HintEncoder(3, config.hint_block_channels, config.pixel_hint_channels)
                self.controlnet_x_embedder = nn.Linear(t["in_channels"], inner)
            if config.num_mode is not None:
                self.controlnet_mode_embedder = nn.Embedding(config.num_mode, inner)

    # -------------------------------------------------------------------- construction
    @classmethod
    def from_transformer(
        cls, transformer: FluxTransformer2DModel, config: FluxControlNetConfig | None = None, *, seed: int = 0
    ) -> FluxControlNet:
        """A fresh ControlNet for ``transformer``: its embedders and first blocks copied exactly,
        every zero layer zero, a Union's mode embedding drawn from ``seed`` (the global RNG is
        left alone). The base's output is unchanged until training opens the zero layers."""
        config = config or FluxControlNetConfig()
        have = (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
        if config.num_layers > have[0] or config.num_single_layers > have[1]:
            raise ValueError(
                f"cannot copy {config.num_layers} double and {config.num_single_layers} single blocks "
                f"of a transformer that has {have[0]} and {have[1]}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cn = cls(dict(transformer.config), config)
        copy_twins(cn, transformer)
        return cn

    @property
    def mask_channels(self) -> int:
        """Channels of the inpainting mask the condition carries beside its latents (0: none)."""
        return self.config.extra_condition_channels // 4

    @property
    def mode_names(self) -> dict[int, tuple[str, ...]]:
        """The published Union ControlNets' names for their modes, for a model of their size (10
        modes); other Union ControlNets (and plain ones) have numbers only."""
        return dict(FLUX_UNION_MODES) if self.config.num_mode == 10 else {}

    @property
    def num_residuals(self) -> int:
        """One residual per copied block, double blocks first."""
        return self.config.num_layers + self.config.num_single_layers

    # -------------------------------------------------------------------- the controlled copy
    def condition_layer(self) -> nn.Module:
        return self.controlnet_x_embedder

    def embed_condition(self, c: torch.Tensor) -> torch.Tensor:
        """Z_in(c): packed condition latents through ``controlnet_x_embedder``; or, for a pixel
        hint, the image through the hint encoder, packed in 2x2 patches, then embedded."""
        if self.config.pixel_hint_channels is None:
            return self.controlnet_x_embedder(c)
        return self.controlnet_x_embedder(pack(self.input_hint_block(c)))

    def output_layers(self) -> list[nn.Module]:
        return [*self.controlnet_blocks, *self.controlnet_single_blocks]

    def copy_forward(
        self,
        h: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> list[torch.Tensor]:
        outputs = []
        for block in self.transformer_blocks:
            text, h = block(hidden_states=h, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
            outputs.append(h)
        for block in self.single_transformer_blocks:
            text, h = block(hidden_states=h, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
            outputs.append(h)
        return outputs

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        *,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        mode: int | torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> FluxResiduals:
        """Residuals for the base's blocks. ``hidden_states``: packed noisy latents (B, L, 64);
        ``condition``: the packed condition latents, same shape (a pixel-hint ControlNet: the
        condition image in [-1, 1], ``2 * pixel_hint_scale`` times the token grid); ``timestep`` in [0, 1] and
        ``guidance`` as the base takes them (diffusers' convention: both times 1000 inside);
        ``mode``: a Union ControlNet's control mode, for every sample or as (B, 1) indices (a
        tensor's range is checked only where reading it back cannot stall a CUDA graph capture)."""
        given = hidden_states.dtype
        hidden_states, condition, encoder_hidden_states, pooled_projections = in_precision(
            self.x_embedder.weight.dtype, hidden_states, condition, encoder_hidden_states, pooled_projections
        )
        x = self.x_embedder(hidden_states)
        c = self.embed_condition(condition)
        timestep = timestep.to(x.dtype) * 1000
        if guidance is not None and isinstance(
            self.time_text_embed, CombinedTimestepGuidanceTextProjEmbeddings
        ):
            temb = self.time_text_embed(timestep, guidance.to(x.dtype) * 1000, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        text = self.context_embedder(encoder_hidden_states)
        if self.config.num_mode is not None:
            if mode is None:
                raise ValueError(f"a Union ControlNet needs a control mode (0-{self.config.num_mode - 1})")
            if isinstance(mode, int):
                if not 0 <= mode < self.config.num_mode:
                    raise ValueError(f"control mode must be in 0-{self.config.num_mode - 1}, got {mode}")
                mode = torch.full((x.shape[0], 1), mode, device=x.device)
            elif not _capturing(mode) and bool(((mode < 0) | (mode >= self.config.num_mode)).any()):
                raise ValueError(f"control mode must be in 0-{self.config.num_mode - 1}, got {mode.tolist()}")
            text = torch.cat([self.controlnet_mode_embedder(mode), text], dim=1)
            txt_ids = torch.cat([txt_ids[:1], txt_ids], dim=0)
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        res = list(in_precision(given, *self.residuals(x, c, text, temb, rotary)))
        n = self.config.num_layers
        out = FluxResiduals(res[:n] or None, res[n:] or None)
        return out if scale == 1.0 else out.scaled(scale)


def _capturing(t: torch.Tensor) -> bool:
    """Whether work on ``t`` is being recorded (a CUDA graph capture, torch.compile's tracing),
    where a value cannot be read back."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


#: diffusers' FluxTransformer2DModel defaults (Flux.1 at full size), for fields a config omits.
_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
