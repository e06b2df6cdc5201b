"""Flux.1 ControlNet files: the published single file, diffusers' folder, and ours.

- **published** (InstantX, Shakker-Labs, and what diffusers saves as one file): the state dict of
  :class:`~controlnet.families.flux.FluxControlNet` as is, no config. The architecture is read
  off the tensors: copied double blocks (``transformer_blocks.N``) and single blocks
  (``single_transformer_blocks.N``), the width (``x_embedder``), the latent channels, the text
  width (``context_embedder``), the pooled width, the head size (``attn.norm_q``, one weight per
  head channel), the guidance input (``time_text_embed.guidance_embedder``, Flux.1-dev) and a
  Union's modes (``controlnet_mode_embedder``). The rotary axes are Flux.1's (16, 56, 56) unless
  a config says otherwise.
- **diffusers**: a folder with ``config.json`` (``_class_name: FluxControlNetModel``) and
  ``diffusion_pytorch_model.safetensors`` (the same names).
- **ours**: the single file with the architecture in its metadata (``family: flux``,
  ``transformer_config``, ``controlnet_config``).

XLabs' own layout (``double_blocks.N.img_attn.qkv``, a conv hint encoder) is not read yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..families.flux.controlnet import FLUX_FIELDS, FluxControlNet, FluxControlNetConfig
from .build import FORMAT_VERSION, META_FORMAT, META_VERSION
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, dump_json, read_json, save_safetensors
from .keymap import identity_rules, load_into

__all__ = [
    "FAMILY",
    "describe",
    "is_flux_file",
    "is_flux_folder",
    "load_file",
    "load_folder",
    "save",
]

FAMILY = "flux"
CLASS_NAME = "FluxControlNetModel"
WEIGHTS = "diffusion_pytorch_model"
FLUX_HEAD, FLUX_AXES = 128, (16, 56, 56)  # Flux.1's head size, split by its rotary axes
#: what only a Flux ControlNet holds
MARKERS = ("controlnet_x_embedder.weight", "x_embedder.weight", "context_embedder.weight")


def is_flux_file(tf: TensorFile) -> bool:
    """Our Flux file (by its metadata) or a published one (by its key names)."""
    return tf.metadata.get("family") == FAMILY or all(k in tf for k in MARKERS)


def is_flux_folder(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and read_json(cfg).get("_class_name") == CLASS_NAME


def _count(tf: TensorFile, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in tf if (m := rx.match(k))})


def _shape(tf: TensorFile, key: str) -> tuple[int, ...]:
    if key not in tf:
        raise CheckpointError(f"{tf.path}: expected {key!r} (cannot read the architecture without it)")
    return tuple(tf.shapes[key])


def _inferred(tf: TensorFile) -> tuple[dict[str, Any], FluxControlNetConfig]:
    """The architecture of a published file, from its tensors."""
    inner, channels = _shape(tf, "x_embedder.weight")
    head = "transformer_blocks.0.attn.norm_q.weight"
    if head not in tf:
        head = "single_transformer_blocks.0.attn.norm_q.weight"
    head_dim = _shape(tf, head)[0]
    if inner % head_dim:
        raise CheckpointError(f"{tf.path}: width {inner} is not a multiple of the head size {head_dim}")
    if head_dim != FLUX_HEAD:  # the rotary axes split a head; only Flux.1's split is known
        raise CheckpointError(
            f"{tf.path}: heads of {head_dim} channels, not Flux.1's {FLUX_HEAD}: the rotary axes are not in "
            "the tensors (load it from a diffusers folder, whose config.json gives axes_dims_rope)"
        )
    transformer = {
        "patch_size": 1,  # 2x2 patches are packed into the 64 channels before the network
        "in_channels": channels,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(tf, "context_embedder.weight")[1],
        "pooled_projection_dim": _shape(tf, "time_text_embed.text_embedder.linear_1.weight")[1],
        "guidance_embeds": any(k.startswith("time_text_embed.guidance_embedder.") for k in tf),
        "axes_dims_rope": list(FLUX_AXES),
    }
    modes = tf.shapes.get("controlnet_mode_embedder.weight")
    config = FluxControlNetConfig(
        num_layers=_count(tf, r"transformer_blocks\.(\d+)\."),
        num_single_layers=_count(tf, r"single_transformer_blocks\.(\d+)\."),
        num_mode=None if modes is None else modes[0],
    )
    return transformer, config


def _stored(tf: TensorFile) -> tuple[dict[str, Any], FluxControlNetConfig] | None:
    raw_t, raw_c = tf.metadata.get("transformer_config"), tf.metadata.get("controlnet_config")
    if raw_t is None or raw_c is None:
        return None
    try:
        return dict(json.loads(raw_t)), FluxControlNetConfig.from_dict(json.loads(raw_c))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{tf.path}: stored Flux ControlNet config is invalid ({e})") from None


def arch(tf: TensorFile) -> tuple[dict[str, Any], FluxControlNetConfig]:
    """(transformer config, ControlNet config): stored in our files, else read off the tensors."""
    stored = _stored(tf)
    if stored is not None:
        return stored
    try:
        return _inferred(tf)
    except ValueError as e:
        raise CheckpointError(f"{tf.path}: {e}") from None


def _build(transformer: dict[str, Any], config: FluxControlNetConfig, where: str) -> FluxControlNet:
    try:
        return FluxControlNet(transformer, config, device="meta")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a usable Flux ControlNet config ({e})") from None


def load_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> FluxControlNet:
    cn = _build(*arch(tf), str(tf.path))
    return load_into(cn, tf, identity_rules, present=tf.keys(), what="Flux ControlNet", dtype=dtype)


def folder_arch(folder: Path) -> tuple[dict[str, Any], FluxControlNetConfig]:
    config = read_json(folder / "config.json")
    if config.get("conditioning_embedding_channels") is not None:
        raise CheckpointError(
            f"{folder / 'config.json'}: a pixel hint encoder (XLabs-style conditioning_embedding_channels) "
            "is not supported yet"
        )
    transformer = {k: config[k] for k in FLUX_FIELDS if k in config}
    try:
        cn_config = FluxControlNetConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    return transformer, cn_config


def load_folder(folder: Path, *, dtype: torch.dtype | None = None) -> FluxControlNet:
    from .diffusers import open_weights

    cn = _build(*folder_arch(folder), str(folder))
    tf = open_weights(folder, WEIGHTS)
    return load_into(cn, tf, identity_rules, present=tf.keys(), what="Flux ControlNet", dtype=dtype)


def metadata(cn: FluxControlNet) -> dict[str, str]:
    return {
        "family": FAMILY,
        "transformer_config": json.dumps(cn.transformer_config, sort_keys=True),
        "controlnet_config": json.dumps(cn.config.to_dict(), sort_keys=True),
    }


def save(cn: FluxControlNet, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """``fmt``: 'controlnet' (ours), 'original' (the published single file: the same tensors, no
    config) or 'diffusers' (a folder)."""
    state = {k: v.contiguous() for k, v in cn.state_dict().items()}
    if fmt == "diffusers":
        config = {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__}
        config.update({k: list(v) if isinstance(v, tuple) else v for k, v in cn.transformer_config.items()})
        config.update(cn.config.to_dict())
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            tmp.mkdir()
            (tmp / "config.json").write_text(dump_json(config))
            save_safetensors(state, tmp / f"{WEIGHTS}.safetensors", {"format": "pt", **metadata(cn)})
        return [path]
    meta = {"format": "pt"}
    if fmt == "controlnet":
        meta = {META_FORMAT: "controlnet", META_VERSION: FORMAT_VERSION, **metadata(cn)}
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        save_safetensors(state, tmp, meta)
    return [path]


def describe(transformer: dict[str, Any], config: FluxControlNetConfig) -> dict[str, Any]:
    """What ``inspect`` says of a Flux ControlNet's options."""
    return {
        "double_blocks": config.num_layers,
        "single_blocks": config.num_single_layers,
        "union_modes": config.num_mode,
        "guidance_input": bool(transformer.get("guidance_embeds", False)),
        "in_channels": transformer.get("in_channels", 64),
    }
