"""Model families (SD1.x, SD2.x, SDXL) and the architecture configs that ship with the package.

Nothing is ever fetched: a loader picks one of these by looking at tensor shapes, or reads a
config stored inside our own checkpoints. UNet configs are diffusers' ``UNet2DConditionModel``
keyword arguments.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = [
    "Family",
    "family_of_unet_config",
    "text_encoder_config",
    "tiny_unet_config",
    "unet_config",
    "vae_config",
]


class Family(Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]


_SD1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}

_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

_UNETS = {Family.SD1: _SD1_UNET, Family.SD2: _SD2_UNET, Family.SDXL: _SDXL_UNET}


def unet_config(family: Family) -> dict[str, Any]:
    """A fresh copy of the full-size UNet config of ``family`` (diffusers keyword arguments)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _UNETS[family].items()}


def family_of_unet_config(config: dict[str, Any]) -> Family:
    """The family whose structure a UNet ``config`` has: SDXL's added text/time embedding, SD2's
    linear attention projections, else SD1. Widths are not compared, so the tiny test and demo
    models (their family's structure at a few channels) belong to their family too."""
    if config.get("addition_embed_type") == "text_time":
        return Family.SDXL
    return Family.SD2 if config.get("use_linear_projection") else Family.SD1


# The VAE is the same network in every family; SDXL's was retrained and is scaled differently.
_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def vae_config(family: Family) -> dict[str, Any]:
    """The full-size ``AutoencoderKL`` config of ``family`` (diffusers keyword arguments)."""
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in _VAE.items()}
    if family is Family.SDXL:
        cfg.update(sample_size=1024, scaling_factor=0.13025)
    return cfg


# CLIP text towers as transformers ``CLIPTextConfig`` keyword arguments. Token ids are the shared
# BPE vocabulary's (see tokenizer.py); OpenCLIP towers use exact GELU, OpenAI's CLIP the quick one.
_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# SD2.x conditions on OpenCLIP ViT-H's penultimate layer (then the final layer norm): a 23-layer
# tower computes exactly that as its last hidden state, so the 24th layer is not built.
_OPENCLIP_H_PENULTIMATE = {
    **_CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 1024,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
# SDXL's second encoder, OpenCLIP ViT-bigG, whole (its pooled, projected output is used too).
_OPENCLIP_BIGG = {
    **_OPENCLIP_H_PENULTIMATE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
}


def text_encoder_config(family: Family, *, second: bool = False) -> dict[str, Any]:
    """The text encoder config of ``family`` (``second``: SDXL's OpenCLIP bigG encoder), as
    ``CLIPTextConfig`` keyword arguments."""
    if second:
        if family is not Family.SDXL:
            raise ValueError(f"{family.label} has one text encoder")
        return dict(_OPENCLIP_BIGG)
    return dict(_OPENCLIP_H_PENULTIMATE if family is Family.SD2 else _CLIP_L)


def tiny_unet_config(family: Family, *, cross_attention_dim: int = 16) -> dict[str, Any]:
    """A few-channel UNet of ``family``'s exact block structure (same residual count and kinds of
    blocks, linear projections for SD2/SDXL, SDXL's added embeddings), for CPU tests and demos."""
    cfg = unet_config(family)
    n = len(cfg["block_out_channels"])
    cfg.update(
        sample_size=16,
        block_out_channels=[8, 16, 16, 16][:n] if n == 4 else [8, 16, 16][:n],
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
    )
    if family is Family.SD1:
        cfg["attention_head_dim"] = 2
    elif family is Family.SD2:
        cfg["attention_head_dim"] = [2, 4, 4, 4]
    else:
        cfg.update(
            attention_head_dim=[2, 4, 4],
            transformer_layers_per_block=[1, 1, 2],
            addition_time_embed_dim=4,
            # pooled text embedding (the second encoder's width, half the context) + 6 time ids
            projection_class_embeddings_input_dim=cross_attention_dim // 2 + 6 * 4,
        )
    return cfg
