"""Whether a ControlNet fits a UNet: the encoder-half config fields both must agree on."""

from __future__ import annotations

from typing import Any

from ...errors import CheckpointError
from .configs import family_of_unet_config

__all__ = ["UNET_FIELDS", "check_compatible"]

#: The UNet config fields a ControlNet depends on (its encoder half): diffusers' ControlNetModel
#: takes exactly these, and a ControlNet fits a UNet when they agree.
UNET_FIELDS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "addition_embed_type_num_heads",
)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _unet_config_of(model: Any) -> dict[str, Any]:
    """The UNet config of a base model, a UNet, or the UNet a ControlNet was copied from."""
    if hasattr(model, "unet_config"):  # a ControlNet
        return dict(model.unet_config)
    return dict(getattr(model, "unet", model).config)


def _describe(config: dict[str, Any]) -> str:
    return f"{family_of_unet_config(config).label}, cross-attention {config.get('cross_attention_dim')}"


def check_compatible(
    controlnet: Any,
    base: Any,
    *,
    controlnet_name: str | None = None,
    base_name: str | None = None,
) -> None:
    """Raise a :class:`CheckpointError` naming both models unless ``controlnet`` was made for a
    UNet of ``base``'s architecture (every field of the UNet's encoder half agrees). ``base`` may
    be another ControlNet: several ControlNets used together must fit one base."""
    if not hasattr(controlnet, "unet_config"):
        raise CheckpointError(
            f"{controlnet_name or 'the ControlNet'} is a {type(controlnet).__name__}, not a ControlNet of "
            f"a UNet: it does not fit {base_name or 'the base model'}"
        )
    theirs = _unet_config_of(base)
    differ = [
        f"{f} {_norm(controlnet.unet_config.get(f))!r} vs {_norm(theirs.get(f))!r}"
        for f in UNET_FIELDS
        if _norm(controlnet.unet_config.get(f)) != _norm(theirs.get(f))
    ]
    if differ:
        cn = controlnet_name or "the ControlNet"
        bm = base_name or "the base model"
        raise CheckpointError(
            f"{cn} ({_describe(controlnet.unet_config)}) does not fit {bm} ({_describe(theirs)}): "
            + "; ".join(differ)
        )
