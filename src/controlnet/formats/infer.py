"""Architectures read off the tensors of files that carry no config, and the original YAML.

A file in the original layout (or bare diffusers-layout ControlNet weights) holds no config, but
its tensors settle almost all of it: the channels of every level, the residual blocks per level,
which levels attend and how deep, linear or convolutional attention projections, the
cross-attention width, SDXL's added embedding, the hint encoder, the VAE's levels and the text
encoders' sizes. What the tensors cannot tell is read from the original YAML (:mod:`.ldm_yaml`:
``unet_config``/``network_config`` and ``control_stage_config``, the v1.1 convention of a
same-named file beside the weights, or one given with ``--config``):

- attention heads (``num_heads`` / ``num_head_channels``); without a YAML, the family's convention
  (SD1: 8 heads, SD2 and SDXL: 64 channels per head), with a warning for unreleased sizes;
- SDXL's time-id embedding width (the conditioner's ``outdim``; 256 for every released model);
- global average pooling (shuffle), ``parameterization: v`` and the VAE's ``scale_factor``.

The original layout has 32 norm groups everywhere (ldm's ``normalization``), so that is not a
choice either. Where the YAML and the tensors disagree on a structural field, the file is refused
naming both.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..families.sd.configs import Family, family_of_unet_config, text_encoder_config, unet_config, vae_config
from .build import numbered, shape_of
from .checkpoint import CheckpointError
from .ldm_yaml import LdmOptions

__all__ = [
    "clip_config",
    "openclip_config",
    "unet_config_diffusers_names",
    "unet_config_original_names",
    "vae_config_original_names",
]

Shapes = Mapping[str, tuple[int, ...]]
GROUPS = 32  # ldm's normalization(): GroupNorm(32, channels) everywhere
SDXL_TIME_DIM = 256  # SDXL's ConcatTimestepEmbedderND outdim (base and refiner)
HEAD_CHANNELS = 64  # CLIP text towers and SD2 / SDXL attention


# ------------------------------------------------------------------------------------ the UNet
@dataclass
class _Level:
    width: int
    resnets: int = 0
    attends: bool = False
    depth: int = 1


@dataclass
class _Encoder:
    """What the tensors of a UNet encoder (or a ControlNet, its copy) say."""

    in_channels: int
    model_channels: int
    time_dim: int
    levels: list[_Level]
    linear: bool | None  # None: no attention anywhere
    context: int | None
    mid_depth: int | None  # None: no attention in the middle block
    scale_shift: bool
    added: int | None  # SDXL's added embedding input width
    out_channels: int | None = None


def _attention(shapes: Shapes, prefix: str, where: str) -> tuple[int, bool, int]:
    """(depth, linear projections, context width) of the attention block under ``prefix``."""
    depth = len(numbered(shapes, re.escape(prefix) + r"transformer_blocks\.(\d+)\..*"))
    proj = shape_of(shapes, prefix + "proj_in.weight", where)
    ctx = shape_of(shapes, prefix + "transformer_blocks.0.attn2.to_k.weight", where)
    return depth, len(proj) == 2, ctx[1]


def _encoder(
    shapes: Shapes,
    where: str,
    *,
    conv_in: str,
    time: str,
    added: str,
    out: str | None,
    mid_attn: str,
    blocks: list[tuple[str, str | None, str | None]],
) -> _Encoder:
    """Read the encoder off the named tensors. ``blocks``: the encoder's blocks in order, each a
    residual block (its second conv's weight, its attention's prefix or None, None) or a
    downsampler ("", None, its weight), which ends a level."""
    c_in = shape_of(shapes, conv_in, where)
    t = shape_of(shapes, time, where)
    levels: list[_Level] = []
    linear: set[bool] = set()
    contexts: set[int] = set()
    scale_shift: set[bool] = set()
    level = None
    for conv2, attn, down in blocks:
        if down is not None:
            if level is None:
                raise CheckpointError(f"{where}: a downsampler before any residual block ({down})")
            levels.append(level)
            level = None
            continue
        width = shape_of(shapes, conv2, where)[0]
        if level is None:
            level = _Level(width)
        elif width != level.width:
            raise CheckpointError(
                f"{where}: residual blocks of one level have widths {level.width} and {width}"
            )
        level.resnets += 1
        emb = conv2.replace("out_layers.3.weight", "emb_layers.1.weight").replace(
            "conv2.weight", "time_emb_proj.weight"
        )
        if emb in shapes:
            scale_shift.add(shapes[emb][0] == 2 * width)
        if attn is not None:
            depth, lin, ctx = _attention(shapes, attn, where)
            level.attends, level.depth = True, depth
            linear.add(lin)
            contexts.add(ctx)
    if level is not None:
        levels.append(level)
    mid_depth = None
    if any(k.startswith(mid_attn) for k in shapes):
        mid_depth, lin, ctx = _attention(shapes, mid_attn, where)
        linear.add(lin)
        contexts.add(ctx)
    if not levels:
        raise CheckpointError(f"{where}: no residual blocks found (not a UNet encoder)")
    if len(linear) > 1 or len(contexts) > 1 or len(scale_shift) > 1:
        raise CheckpointError(f"{where}: attention blocks of different kinds or widths in one model")
    return _Encoder(
        in_channels=c_in[1],
        model_channels=c_in[0],
        time_dim=t[0],
        levels=levels,
        linear=linear.pop() if linear else None,
        context=contexts.pop() if contexts else None,
        mid_depth=mid_depth,
        scale_shift=bool(scale_shift and scale_shift.pop()),
        added=shapes[added][1] if added in shapes else None,
        out_channels=shapes[out][0] if out is not None and out in shapes else None,
    )


def _original_encoder(shapes: Shapes, prefix: str, where: str) -> _Encoder:
    blocks: list[tuple[str, str | None, str | None]] = []
    for n in numbered(shapes, re.escape(prefix) + r"input_blocks\.(\d+)\..*"):
        if n == 0:
            continue
        b = f"{prefix}input_blocks.{n}."
        if b + "0.op.weight" in shapes:
            blocks.append(("", None, b + "0.op.weight"))
        else:
            attn = b + "1." if any(k.startswith(b + "1.") for k in shapes) else None
            blocks.append((b + "0.out_layers.3.weight", attn, None))
    return _encoder(
        shapes,
        where,
        conv_in=prefix + "input_blocks.0.0.weight",
        time=prefix + "time_embed.0.weight",
        added=prefix + "label_emb.0.0.weight",
        out=prefix + "out.2.weight",
        mid_attn=prefix + "middle_block.1.",
        blocks=blocks,
    )


def _diffusers_encoder(shapes: Shapes, prefix: str, where: str) -> _Encoder:
    blocks: list[tuple[str, str | None, str | None]] = []
    for b in numbered(shapes, re.escape(prefix) + r"down_blocks\.(\d+)\..*"):
        d = f"{prefix}down_blocks.{b}."
        for j in numbered(shapes, re.escape(d) + r"resnets\.(\d+)\..*"):
            attn = f"{d}attentions.{j}."
            blocks.append(
                (f"{d}resnets.{j}.conv2.weight", attn if attn + "proj_in.weight" in shapes else None, None)
            )
        if d + "downsamplers.0.conv.weight" in shapes:
            blocks.append(("", None, d + "downsamplers.0.conv.weight"))
    return _encoder(
        shapes,
        where,
        conv_in=prefix + "conv_in.weight",
        time=prefix + "time_embedding.linear_1.weight",
        added=prefix + "add_embedding.linear_1.weight",
        out=prefix + "conv_out.weight",
        mid_attn=prefix + "mid_block.attentions.0.",
        blocks=blocks,
    )


def _yaml_agrees(enc: _Encoder, params: Mapping[str, Any], source: str, where: str) -> None:
    """Structural fields of the YAML against the tensors; the tensors are what gets loaded."""
    widths = [lv.width for lv in enc.levels]
    said = {
        "in_channels": enc.in_channels,
        "model_channels": enc.model_channels,
        "channel_mult": [w // enc.model_channels for w in widths],
        "num_res_blocks": enc.levels[0].resnets,
        "context_dim": enc.context,
        "adm_in_channels": enc.added,
    }
    for name, got in said.items():
        value = params.get(name)
        if value is None or got is None:
            continue
        if isinstance(value, (list, tuple)):
            value = list(value)
        if value != got:
            raise CheckpointError(f"{source}: {name} is {value}, but the tensors of {where} say {got}")


def _heads(
    enc: _Encoder, family: Family, options: LdmOptions, control: bool, released: bool, where: str
) -> int | list[int]:
    widths = [lv.width for lv in enc.levels]
    given = options.heads(control)
    if "num_head_channels" in given:
        per = int(given["num_head_channels"])
        bad = [w for w in widths if w % per]
        if bad:
            raise CheckpointError(f"{options.source}: num_head_channels {per} does not divide width {bad[0]}")
        return [w // per for w in widths]
    if "num_heads" in given:
        return int(given["num_heads"])
    if released:
        return unet_config(family)["attention_head_dim"]
    convention = "8 heads" if family is Family.SD1 else f"{HEAD_CHANNELS} channels per head"
    warnings.warn(
        f"{where}: attention heads are not stored in the tensors and no YAML gives them; assuming "
        f"{family.label}'s {convention} (give the original YAML with --config, or beside the file)",
        stacklevel=4,
    )
    if family is Family.SD1:
        return 8
    bad = [w for w in widths if w % HEAD_CHANNELS]
    if bad:
        raise CheckpointError(
            f"{where}: width {bad[0]} is not a multiple of {HEAD_CHANNELS}: give the heads with --config"
        )
    return [w // HEAD_CHANNELS for w in widths]


def _unet_config(
    enc: _Encoder,
    where: str,
    options: LdmOptions,
    *,
    control: bool,
    pooled: int | None = None,
) -> dict[str, Any]:
    """A diffusers UNet config of the encoder's structure; the family's for what is not decided."""
    counts = {lv.resnets for lv in enc.levels}
    if len(counts) != 1:
        raise CheckpointError(f"{where}: levels with different numbers of residual blocks ({sorted(counts)})")
    if enc.context is None:
        raise CheckpointError(f"{where}: no cross-attention anywhere (not a text-conditioned UNet)")
    if enc.mid_depth is None:
        raise CheckpointError(f"{where}: the middle block has no attention (not a Stable Diffusion UNet)")
    for w in [lv.width for lv in enc.levels]:
        if w % GROUPS:
            raise CheckpointError(
                f"{where}: width {w} is not a multiple of {GROUPS}, the norm groups of a file without "
                "a config (ldm's fixed choice)"
            )
    depths = [lv.depth if lv.attends else 1 for lv in enc.levels]
    last = enc.levels[-1]
    if last.attends and last.depth != enc.mid_depth:
        raise CheckpointError(
            f"{where}: the middle block is {enc.mid_depth} transformer blocks deep and the last level "
            f"{last.depth}; diffusers' UNet ties the two"
        )
    depths[-1] = enc.mid_depth  # diffusers' middle block takes the last level's depth
    structure = {"use_linear_projection": bool(enc.linear)}
    if enc.added is not None:
        structure["addition_embed_type"] = "text_time"
    family = family_of_unet_config(structure)
    widths = [lv.width for lv in enc.levels]
    cfg = unet_config(family)
    released = (
        widths == cfg["block_out_channels"]
        and enc.context == cfg["cross_attention_dim"]
        and counts == {cfg["layers_per_block"]}
    )
    _yaml_agrees(enc, options.control if control and options.control else options.unet, options.source, where)
    cfg.update(
        in_channels=enc.in_channels,
        block_out_channels=widths,
        layers_per_block=counts.pop(),
        down_block_types=["CrossAttnDownBlock2D" if lv.attends else "DownBlock2D" for lv in enc.levels],
        up_block_types=["CrossAttnUpBlock2D" if lv.attends else "UpBlock2D" for lv in reversed(enc.levels)],
        cross_attention_dim=enc.context,
        attention_head_dim=_heads(enc, family, options, control, released, where),
        norm_num_groups=GROUPS,
    )
    if enc.out_channels is not None:
        cfg["out_channels"] = enc.out_channels
    if enc.linear:
        cfg["use_linear_projection"] = True
    if any(d != 1 for d in depths):
        cfg["transformer_layers_per_block"] = depths
    else:
        cfg.pop("transformer_layers_per_block", None)
    if enc.time_dim != 4 * enc.model_channels:
        cfg["time_embedding_dim"] = enc.time_dim
    if enc.scale_shift:
        cfg["resnet_time_scale_shift"] = "scale_shift"
    if enc.added is not None:
        cfg.update(
            projection_class_embeddings_input_dim=enc.added,
            addition_time_embed_dim=_time_ids_width(enc.added, options, pooled, where),
        )
    return cfg


def _time_ids_width(added: int, options: LdmOptions, pooled: int | None, where: str) -> int:
    """SDXL's added embedding reads the pooled text embedding and 6 time ids of this width each."""
    if options.time_embed_dim is not None:
        return options.time_embed_dim
    if pooled is not None and (added - pooled) > 0 and (added - pooled) % 6 == 0:
        return (added - pooled) // 6
    if added == 1280 + 6 * SDXL_TIME_DIM:
        return SDXL_TIME_DIM
    raise CheckpointError(
        f"{where}: the added embedding reads {added} features, which the released SDXL layout does not "
        "explain: give the original YAML (its conditioner's outdim) with --config"
    )


def unet_config_original_names(
    shapes: Shapes, prefix: str, where: str, options: LdmOptions | None = None, *, pooled: int | None = None
) -> dict[str, Any]:
    """The diffusers UNet config of a UNet (``model.diffusion_model.``) or ControlNet
    (``control_model.``) in the original layout."""
    options = options or LdmOptions()
    control = prefix.startswith("control_model")
    return _unet_config(
        _original_encoder(shapes, prefix, where), where, options, control=control, pooled=pooled
    )


def unet_config_diffusers_names(
    shapes: Shapes, where: str, options: LdmOptions | None = None
) -> dict[str, Any]:
    """The same for a ControlNet in diffusers' names (bare weights without their config.json)."""
    return _unet_config(_diffusers_encoder(shapes, "", where), where, options or LdmOptions(), control=True)


# ------------------------------------------------------------------------------------ VAE, text
def vae_config_original_names(
    shapes: Shapes, prefix: str, family: Family, where: str, options: LdmOptions | None = None
) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of ``first_stage_model.*`` tensors."""
    levels = numbered(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\..*")
    if not levels:
        raise CheckpointError(f"{where}: no VAE encoder levels ({prefix}encoder.down.*)")
    widths = [shape_of(shapes, f"{prefix}encoder.down.{i}.block.0.conv2.weight", where)[0] for i in levels]
    layers = len(numbered(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\..*"))
    cfg = vae_config(family)
    cfg.update(
        in_channels=shape_of(shapes, prefix + "encoder.conv_in.weight", where)[1],
        out_channels=shape_of(shapes, prefix + "decoder.conv_out.weight", where)[0],
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=shape_of(shapes, prefix + "decoder.conv_in.weight", where)[1],
        norm_num_groups=GROUPS,
    )
    if options is not None and options.scale_factor is not None:
        cfg["scaling_factor"] = options.scale_factor
    return cfg


def _text(
    base: dict[str, Any], vocab: int, hidden: int, positions: int, layers: int, inner: int
) -> dict[str, Any]:
    if hidden % HEAD_CHANNELS:
        raise ValueError(f"text width {hidden} is not a multiple of {HEAD_CHANNELS}")
    return {
        **base,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": positions,
        "num_hidden_layers": layers,
        "intermediate_size": inner,
        "num_attention_heads": hidden // HEAD_CHANNELS,
    }


def clip_config(shapes: Shapes, prefix: str, family: Family, where: str) -> dict[str, Any]:
    """``CLIPTextConfig`` arguments of an OpenAI CLIP tower in transformers' names (SD1's and
    SDXL's first encoder); heads are 64 channels wide in every CLIP."""
    p = prefix + "text_model."
    vocab, hidden = shape_of(shapes, p + "embeddings.token_embedding.weight", where)
    positions = shape_of(shapes, p + "embeddings.position_embedding.weight", where)[0]
    layers = len(numbered(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\..*"))
    inner = shape_of(shapes, p + "encoder.layers.0.mlp.fc1.weight", where)[0]
    try:
        cfg = _text(text_encoder_config(family), vocab, hidden, positions, layers, inner)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    cfg["projection_dim"] = shapes.get(prefix + "text_projection.weight", (hidden,))[0]
    return {**cfg, "architectures": ["CLIPTextModel"]}


def openclip_config(
    shapes: Shapes, prefix: str, family: Family, where: str, *, second: bool
) -> dict[str, Any]:
    """``CLIPTextConfig`` arguments of an OpenCLIP tower (SD2's encoder, one layer short for the
    penultimate convention; SDXL's second, whole and projected)."""
    vocab, hidden = shape_of(shapes, prefix + "token_embedding.weight", where)
    positions = shape_of(shapes, prefix + "positional_embedding", where)[0]
    layers = len(numbered(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\..*"))
    inner = shape_of(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight", where)[0]
    base = text_encoder_config(family, second=second)
    try:
        cfg = _text(base, vocab, hidden, positions, layers if second else layers - 1, inner)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if second:
        cfg["projection_dim"] = shape_of(shapes, prefix + "text_projection", where)[1]
        return {**cfg, "architectures": ["CLIPTextModelWithProjection"]}
    return {**cfg, "architectures": ["CLIPTextModel"]}
