"""Our own format: one safetensors file that carries its architecture in the header's metadata.

Metadata (all strings; the JSON ones are objects)::

    controlnet_format          "controlnet" or "base"
    controlnet_format_version  "1"
    family                     "sd1" | "sd2" | "sdxl"
    unet_config                JSON, diffusers UNet2DConditionModel arguments   (ControlNet)
    controlnet_config          JSON, ControlNetConfig                           (ControlNet)
    base_config                JSON, BaseConfig: unet, vae, text_encoder(_2), schedule (base)
    generation_settings        JSON, the generation settings the model was made for, such as
                               {"guidance": 1.5}; they apply wherever it is loaded (base, optional)

A ControlNet's tensors are its state dict as is (diffusers' names). A base model's are under
``unet.``, ``vae.``, ``text_encoder.`` and ``text_encoder_2.``, text encoders with the usual
``text_model.*`` names. Any architecture loads: nothing is inferred, everything is stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..families.sd.base import UNetBase
from ..families.sd.controlnet import ControlNet
from .build import (
    FORMAT_VERSION,
    META_FORMAT,
    META_VERSION,
    BaseConfig,
    Loader,
    base_metadata,
    build_controlnet,
    controlnet_metadata,
    stored_base_config,
    stored_controlnet_arch,
    text_key_prefix,
)
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, list_keys, save_safetensors
from .keymap import identity_rules, load_into

__all__ = [
    "BASE",
    "CONTROLNET",
    "base_loader",
    "kind_of",
    "load_controlnet",
    "save_base",
    "save_controlnet",
    "settings_metadata",
    "stored_settings",
]

CONTROLNET = "controlnet"
BASE = "base"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
META_SETTINGS = "generation_settings"


def settings_metadata(base: Any) -> dict[str, str]:
    """The metadata entry that keeps a base model's generation settings in our format (none for
    a model that carries none), whatever its family."""
    return {META_SETTINGS: json.dumps(base.settings, sort_keys=True)} if base.settings else {}


def stored_settings(tf: TensorFile) -> dict[str, Any]:
    """The generation settings a base model in our format carries ({} when none)."""
    raw = tf.metadata.get(META_SETTINGS) if kind_of(tf) == BASE else None
    if raw is None:
        return {}
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tf.path}: metadata entry {META_SETTINGS!r} is not JSON ({e})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{tf.path}: metadata entry {META_SETTINGS!r} is not a JSON object")
    return settings


def kind_of(tf: TensorFile) -> str | None:
    """'controlnet' or 'base' for a file in our format, None for any other file."""
    kind = tf.metadata.get(META_FORMAT)
    if kind is None:
        return None
    version = tf.metadata.get(META_VERSION)
    if kind not in (CONTROLNET, BASE) or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{tf.path}: unsupported controlnet format {kind!r} version {version!r} "
            f"(this version reads '{CONTROLNET}'/'{BASE}' version {FORMAT_VERSION})"
        )
    return kind


def _expect(tf: TensorFile, kind: str) -> None:
    found = kind_of(tf)
    if found != kind:
        raise CheckpointError(f"{tf.path}: is a {found or 'foreign'} file, expected our {kind} format")


def load_controlnet(tf: TensorFile, *, dtype: torch.dtype | None = None) -> ControlNet:
    _expect(tf, CONTROLNET)
    arch = stored_controlnet_arch(tf)
    if arch is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks unet_config / controlnet_config")
    cn = build_controlnet(*arch)
    return load_into(cn, tf, identity_rules, present=tf.keys(), what="ControlNet", dtype=dtype)


def save_controlnet(cn: ControlNet, path: Path, *, overwrite: bool = False) -> list[Path]:
    metadata = {META_FORMAT: CONTROLNET, META_VERSION: FORMAT_VERSION}
    metadata.update(controlnet_metadata(cn.unet_config, cn.config))
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        save_safetensors(cn.state_dict(), tmp, metadata)
    return [path]


def base_loader(tf: TensorFile, *, dtype: torch.dtype | None = None) -> tuple[BaseConfig, Loader]:
    """The stored architecture and a function that fills one part of it."""
    _expect(tf, BASE)
    config = stored_base_config(tf)
    if config is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks base_config")
    stray = [k for k in tf if k.split(".", 1)[0] not in PARTS]
    if stray:
        raise CheckpointError(f"{tf.path}: unexpected keys ({len(stray)}): {list_keys(stray)}")

    def load(part: str, module: torch.nn.Module) -> torch.nn.Module:
        prefix = _prefix(part, module)
        return load_into(
            module,
            tf,
            lambda keys: identity_rules(keys, prefix),
            present=tf.with_prefix(f"{part}."),
            what=part,
            dtype=dtype,
        )

    return config, load


def _prefix(part: str, module: torch.nn.Module) -> str:
    return f"{part}." + (text_key_prefix(module) if part.startswith("text_encoder") else "")


def save_base(base: UNetBase, path: Path, *, overwrite: bool = False) -> list[Path]:
    tensors: dict[str, torch.Tensor] = {}
    for part, module in base.modules().items():
        tensors.update({_prefix(part, module) + k: v for k, v in module.state_dict().items()})
    metadata = {
        META_FORMAT: BASE,
        META_VERSION: FORMAT_VERSION,
        **base_metadata(base),
        **settings_metadata(base),
    }
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        save_safetensors(tensors, tmp, metadata)
    return [path]
