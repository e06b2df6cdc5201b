"""Shared tiny models: few channels, the real block structure of each family."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from controlnet import ControlNet, ControlNetConfig, Family
from controlnet.families import tiny_unet_config

LATENT = 8  # latent side; condition images are 8x larger
CROSS = 16
TINY_HINT = ControlNetConfig(hint_block_channels=(4, 8, 8, 16))


def make_unet(family: Family, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(family, cross_attention_dim=CROSS)).eval()


def make_controlnet(
    unet: UNet2DConditionModel, *, open_zero: bool = False, seed: int = 1, **cfg
) -> ControlNet:
    """A ControlNet copied from ``unet``; with ``open_zero`` its zero convs get random weights, as
    after training, so its residuals are not all zero."""
    config = ControlNetConfig(**{**TINY_HINT.to_dict(), **cfg})
    cn = ControlNet.from_unet(unet, config)
    if open_zero:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for z in cn.zero_convs():
                for p in z.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cn


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 2) -> dict:
    """Random latents, timesteps, context (and SDXL added conditions) for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, CROSS, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, CROSS, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g) * 64,
        }
    return inputs


def cond_image(batch: int = 2, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, LATENT * 8, LATENT * 8, generator=g)
