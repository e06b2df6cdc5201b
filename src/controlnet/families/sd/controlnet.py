"""The ControlNet for a Stable Diffusion-family UNet (paper section 3.2).

A trainable copy of the locked UNet's encoder half - input conv, time embedding (and SDXL's
added text/time embedding), every down block and the middle block - reads the latent plus a
condition image and returns one residual per encoder output plus one for the middle block, each
through a zero convolution. For SD1.x/SD2.x that is 12 + 1 = 13 residuals; for SDXL 9 + 1 = 10.

Attribute names follow diffusers' ControlNet layout, so a diffusers-format state dict loads with
no key mapping, and the original (ldm) layout needs only the UNet's own key mapping.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ...model.hint import HintEncoder
from ...model.zero import ControlledCopy, zero_conv
from .halves import embed_time, encode

__all__ = ["ControlNet", "ControlNetConfig", "HintEncoder", "residual_channels"]

#: UNet config keys whose non-default values need parts the ControlNet does not copy.
_UNSUPPORTED = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
}


@dataclass(frozen=True)
class ControlNetConfig:
    """What the ControlNet adds to a UNet copy.

    hint_channels: channels of the condition image (3 for RGB maps).
    hint_block_channels: widths of the hint encoder stages; each stage after the first halves the
        resolution, so ``len - 1`` must equal the VAE's number of 2x down-samplings (3 for SD).
    global_pool: average each residual over height and width (the v1.1 shuffle model).
    """

    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = field(default=(16, 32, 96, 256))
    global_pool: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_block_channels", tuple(int(c) for c in self.hint_block_channels))
        if self.hint_channels < 1:
            raise ValueError(f"hint_channels must be >= 1, got {self.hint_channels}")
        if len(self.hint_block_channels) < 1 or min(self.hint_block_channels) < 1:
            raise ValueError(f"hint_block_channels must be positive widths, got {self.hint_block_channels}")

    @property
    def hint_downscale(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)

    @staticmethod
    def hint_widths(downscale: int) -> tuple[int, ...]:
        """The paper's hint encoder widths (16, 32, 96, 256 for SD's 8x VAE) for a VAE that scales
        images down ``downscale`` times: one stage per halving after the first, the last 256 wide."""
        if downscale < 1 or downscale & (downscale - 1):
            raise ValueError(f"a VAE's scale factor is a power of two, got {downscale}")
        halvings = downscale.bit_length() - 1
        return (16, 32, 96)[:halvings] + (96,) * max(0, halvings - 3) + (256,)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hint_block_channels"] = list(self.hint_block_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ControlNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ControlNet config keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)


def _check_supported(unet_config: Mapping[str, Any]) -> None:
    for key, expected in _UNSUPPORTED.items():
        if unet_config.get(key) != expected:
            raise ValueError(
                f"UNet config {key}={unet_config.get(key)!r} is not supported by ControlNet "
                f"(expected {expected!r}); supported: SD1.x, SD2.x and SDXL-style UNets"
            )
    added = unet_config.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ValueError(
            f"UNet config addition_embed_type={added!r} is not supported (expected None or 'text_time')"
        )


def residual_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of every tensor the UNet's encoder hands to its decoder as a skip connection."""
    chans = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        chans += [r.out_channels for r in block.resnets]
        if block.downsamplers is not None:
            chans += [d.out_channels for d in block.downsamplers]
    return chans


class ControlNet(ControlledCopy):
    """Trainable copy of a UNet's encoder + hint encoder + zero convolutions: the paper's
    controlled block (:class:`~controlnet.model.zero.ControlledCopy`) around the whole encoder,
    with the hint encoder as Z_in and one zero conv per skip and for the middle block as Z_out.

    Build it with :meth:`from_unet` (exact copy of a locked UNet) or :meth:`from_config`
    (architecture only, for loading weights). ``forward`` returns the residuals; how they enter
    the locked UNet (scales, modes, several ControlNets) is :mod:`controlnet.model.control`.
    """

    def __init__(self, unet: UNet2DConditionModel, config: ControlNetConfig | None = None) -> None:
        super().__init__()
        config = config or ControlNetConfig()
        unet_config = dict(unet.config)
        _check_supported(unet_config)
        if unet.mid_block is None:
            raise ValueError("UNet has no middle block; ControlNet needs one (mid_block_type is None)")
        ref = unet.conv_in.weight
        kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype}

        self.config = config
        self.unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        # The trainable copy: deep copies keep every tensor bit-identical to the UNet's.
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.time_embed_act = copy.deepcopy(unet.time_embed_act)
        self.add_time_proj = copy.deepcopy(getattr(unet, "add_time_proj", None))
        self.add_embedding = copy.deepcopy(getattr(unet, "add_embedding", None))
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        # New parts: hint encoder and one zero conv per residual.
        self.controlnet_cond_embedding = HintEncoder(
            config.hint_channels, config.hint_block_channels, unet.conv_in.out_channels, **kw
        )
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c, c, **kw) for c in residual_channels(unet))
        mid_ch = unet.config.block_out_channels[-1]
        self.controlnet_mid_block = zero_conv(mid_ch, mid_ch, **kw)
        self.requires_grad_(True)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, config: ControlNetConfig | None = None) -> ControlNet:
        """A ControlNet whose copied parts equal ``unet``'s exactly (on its device and dtype)."""
        return cls(unet, config)

    @classmethod
    def from_config(
        cls,
        unet_config: Mapping[str, Any],
        config: ControlNetConfig | None = None,
        *,
        device: torch.device | str = "meta",
        dtype: torch.dtype | None = None,
    ) -> ControlNet:
        """The architecture alone (on the meta device by default: no memory, weights to assign)."""
        with torch.device(device):
            template = UNet2DConditionModel(**unet_config)
        if dtype is not None:
            template = template.to(dtype)
        return cls(template, config)

    # ---------------------------------------------------------------- properties
    @property
    def num_residuals(self) -> int:
        """Encoder skip residuals plus the middle one (13 for SD1.x/SD2.x, 10 for SDXL)."""
        return len(self.controlnet_down_blocks) + 1

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    # ---------------------------------------------------------------- the formula's parts
    def condition_layer(self) -> nn.Module:
        return self.controlnet_cond_embedding

    def output_layers(self) -> list[nn.Module]:
        return [*self.controlnet_down_blocks, self.controlnet_mid_block]

    def copy_forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """The copied encoder from its input conv's output (the hint added): every skip, then the
        middle block's output."""
        h, skips = encode(self, h, emb, context, cross_attention_kwargs)
        return [*skips, h]

    def zero_convs(self) -> list[nn.Module]:
        """The 14 zero-initialised layers (hint encoder's last conv, encoder residuals, middle)."""
        return [self.condition_layer().conv_out, *self.output_layers()]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each copied block's activations in the backward pass instead of storing them."""
        fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = fn

    # ---------------------------------------------------------------- forward
    def encode_hint(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition image (B, hint_channels, H, W), values as the model was trained on (RGB in
        [0, 1] for the released models) -> hint features (B, C0, H/s, W/s), s the hint encoder's
        downscale (8 for SD's VAE). Compute once per generation; every denoising step reuses it."""
        if cond.ndim != 4 or cond.shape[1] != self.config.hint_channels:
            raise ValueError(
                f"condition must have shape (B, {self.config.hint_channels}, H, W), got {tuple(cond.shape)}"
            )
        return self.embed_condition(cond.to(self.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the locked UNet.

        Args:
            sample: noisy latents (B, C, h, w).
            timestep: scalar or (B,) timesteps.
            encoder_hidden_states: text context (B, L, D).
            hint: features from :meth:`encode_hint`, batch B or 1.
        Returns:
            ``num_residuals`` tensors: the encoder skips in order, the middle block's last. Each has
            the matching UNet skip's shape, or (B, C, 1, 1) with ``global_pool``.
        """
        # a ControlNet may run in another precision than the locked UNet beside it (float32 while
        # it trains next to a bfloat16 UNet): its inputs take its own dtype
        dtype = self.dtype
        sample, encoder_hidden_states, hint = (x.to(dtype) for x in (sample, encoder_hidden_states, hint))
        if added_cond_kwargs:
            added_cond_kwargs = {
                k: v.to(dtype) if v.is_floating_point() else v for k, v in added_cond_kwargs.items()
            }
        emb = embed_time(self, sample, timestep, added_cond_kwargs)
        out = self.residuals(self.conv_in(sample), hint, emb, encoder_hidden_states, cross_attention_kwargs)
        if self.config.global_pool:
            out = [r.mean(dim=(2, 3), keepdim=True) for r in out]
        return out
