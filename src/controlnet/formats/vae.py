"""Standalone VAE files, used in place of a base model's own VAE (the A1111 web UI's "SD VAE",
diffusers' ``vae=`` argument).

Three layouts, told apart by their content:
- a diffusers VAE folder: ``config.json`` of an ``AutoencoderKL`` beside its weights;
- a single file in the original layout (``encoder.down.0.block.0.*``, ``quant_conv.*``, ... as
  the fine-tuned SD VAEs ship), also under ``first_stage_model.*`` (a whole checkpoint's VAE);
- a single file in diffusers' layout (``encoder.down_blocks.0.resnets.0.*``).

A file carries no architecture: it is read into the architecture of the VAE it replaces, every
key and shape checked. The latent scale stays the base model's; a folder whose config names
another scale or latent size is a VAE of another family, and is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .build import build_vae, public_config
from .checkpoint import CheckpointError, TensorFile, list_keys, open_tensors, read_json
from .diffusers import WEIGHTS, open_weights
from .keymap import identity_rules, load_into
from .ldm import vae_rule
from .original import VAE

__all__ = ["load_vae"]

_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae(path: str | Path, *, like: AutoencoderKL, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The VAE at ``path``, to replace ``like`` (a base model's VAE), cast to ``dtype`` if given."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, like, dtype)
    return _load_file(open_tensors(path), like, dtype)


def _load_folder(folder: Path, like: AutoencoderKL, dtype: torch.dtype | None) -> AutoencoderKL:
    cfg = folder / "config.json"
    config = read_json(cfg) if cfg.is_file() else {}
    if config.get("_class_name") != "AutoencoderKL":
        raise CheckpointError(f"{folder}: not a diffusers VAE folder (no config.json of an AutoencoderKL)")
    ours = like.config
    for key in ("latent_channels", "scaling_factor"):
        if key in config and config[key] != ours[key]:
            raise CheckpointError(
                f"{folder}: a VAE with {key} {config[key]}, but the base model's latents have "
                f"{ours[key]}: a VAE made for another model family"
            )
    module = build_vae({**public_config(config), "scaling_factor": ours["scaling_factor"]})
    tf = open_weights(folder, WEIGHTS)
    return load_into(module, tf, identity_rules, present=list(tf), what="vae", dtype=dtype)


def _load_file(tf: TensorFile, like: AutoencoderKL, dtype: torch.dtype | None) -> AutoencoderKL:
    prefix = VAE if any(k.startswith(VAE) for k in tf) else ""
    present = [k for k in tf if k.startswith(tuple(prefix + p for p in _PARTS))]
    config = dict(like.config)
    module = build_vae(config)
    if prefix + "encoder.down.0.block.0.conv1.weight" in tf:  # the original layout
        return load_into(
            module,
            tf,
            lambda keys: [vae_rule(k, config, prefix) for k in keys],
            present=present,
            what="vae",
            dtype=dtype,
        )
    if prefix + "encoder.down_blocks.0.resnets.0.conv1.weight" in tf:  # diffusers' layout
        return load_into(
            module, tf, lambda keys: identity_rules(keys, prefix), present=present, what="vae", dtype=dtype
        )
    raise CheckpointError(
        f"{tf.path}: holds no VAE (no encoder.down.0.* or encoder.down_blocks.0.* keys, also not under "
        f"{VAE}*); first keys: {list_keys(list(tf)[:5], 5)}"
    )
