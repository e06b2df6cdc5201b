"""ControlNet files of the transformer families (Flux.1, SD3 / SD3.5, Qwen-Image, Z-Image): the
published single file, diffusers' folder, and ours. One reader and writer for all, told the family
by a :class:`CNSpec` (Z-Image's layout in :mod:`.zimage_controlnet`, XLabs' in :mod:`.xlabs_controlnet`).

- **published** (InstantX, Shakker-Labs, Stability AI, and what diffusers saves as one file): the
  state dict of our ControlNet as is (:class:`~controlnet.families.flux.FluxControlNet`,
  :class:`~controlnet.families.sd3.SD3ControlNet` use the published names), no config. The
  architecture is read off the tensors (see each family's ``_inferred_*``).
- **diffusers**: a folder with ``config.json`` (``_class_name: FluxControlNetModel`` or
  ``SD3ControlNetModel``) and ``diffusion_pytorch_model.safetensors`` (the same names).
- **ours**: the single file with the architecture in its metadata (``family``,
  ``transformer_config``, ``controlnet_config``).

Flux: the blocks copied (``transformer_blocks.N``, ``single_transformer_blocks.N``), width, latent
channels, text and pooled widths, head size (``attn.norm_q``, one weight per head channel), the
guidance input of Flux.1-dev ControlNets and a Union's modes; the rotary axes are Flux.1's for its
128-channel heads. SD3: the joint blocks copied, width, the patch embedding (its patch, channels
and position table), extra condition channels, the text embedder (absent in SD3.5 Large's), the
q/k norms and the dual-attention blocks; heads of 64 channels (every SD3 and SD3.5 model's); the
published convention ties the pooled input to the text: ControlNets that read text read zeros for
the pooled vector (InstantX's), those that do not read it whole (Stability AI's SD3.5 Large ones).
Qwen-Image: the blocks copied, width, latent channels (``img_in``), text width (``txt_in``), the
inpainting ControlNet's extra condition channels; heads of 128 channels with Qwen-Image's rotary
split. XLabs' Flux ControlNets (a pixel hint encoder, the copied double blocks in Black Forest Labs'
names, residuals the base takes in turn) are read and written in their own layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..families.flux.controlnet import FLUX_FIELDS, FluxControlNet, FluxControlNetConfig
from ..families.qwenimage.controlnet import QWEN_FIELDS, QwenImageControlNet, QwenImageControlNetConfig
from ..families.sd3.controlnet import SD3_FIELDS, SD3ControlNet, SD3ControlNetConfig
from ..families.zimage.controlnet import ZIMAGE_FIELDS, ZImageControlNet, ZImageControlNetConfig
from . import xlabs_controlnet, zimage_controlnet
from .build import FORMAT_VERSION, META_FORMAT, META_VERSION, numbered, shape_of
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, dump_json, read_json, save_safetensors
from .flux_bfl import FLUX_AXES, FLUX_HEAD
from .keymap import Rule, identity_rules, load_into

__all__ = [
    "SPECS",
    "CNSpec",
    "arch",
    "describe",
    "diffusers_config",
    "folder_arch",
    "load_file",
    "load_folder",
    "save",
    "spec_of",
]

WEIGHTS = "diffusion_pytorch_model"
SD3_HEAD = 64
QWEN_HEAD, QWEN_AXES = 128, (16, 56, 56)  # Qwen-Image's, the same split


@dataclass(frozen=True)
class CNSpec:
    family: str
    label: str
    class_name: str  # diffusers' class, in config.json
    model: type
    config: type
    fields: tuple[str, ...]  # the base transformer's fields a ControlNet shares
    markers: tuple[str, ...]  # keys only this family's published ControlNets hold
    inferred: Callable[[TensorFile], tuple[dict[str, Any], Any]]
    from_diffusers: Callable[[dict[str, Any]], Any]  # config.json -> our ControlNet config
    to_diffusers: Callable[[Any], dict[str, Any]]  # our ControlNet config -> config.json fields
    describe: Callable[[dict[str, Any], Any], dict[str, Any]]


def _count(tf: TensorFile, pattern: str) -> int:
    """How many distinct numbers ``pattern``'s group 1 takes at the start of the file's keys."""
    return len(numbered(tf.shapes, pattern + ".*"))


def _shape(tf: TensorFile, key: str) -> tuple[int, ...]:
    return shape_of(tf.shapes, key, str(tf.path))


# ------------------------------------------------------------------------------------ Flux.1
def _inferred_flux(tf: TensorFile) -> tuple[dict[str, Any], FluxControlNetConfig]:
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
        # inpainting ones (Alimama's) read the packed mask beside the latents
        extra_condition_channels=_shape(tf, "controlnet_x_embedder.weight")[1] - channels,
    )
    return transformer, config


def _flux_from_diffusers(config: dict[str, Any]) -> FluxControlNetConfig:
    return FluxControlNetConfig.from_dict(
        {**config, "pixel_hint_channels": config.get("conditioning_embedding_channels")}
    )


def _flux_to_diffusers(config: FluxControlNetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "num_layers": config.num_layers,
        "num_single_layers": config.num_single_layers,
        "num_mode": config.num_mode,
    }
    if config.pixel_hint_channels is not None and config.pixel_hint_scale != 8:
        raise ValueError(
            f"diffusers' FluxControlNetModel scales a pixel hint down 8x only, and this ControlNet's "
            f"hint encoder {config.pixel_hint_scale}x: save it in our format or XLabs' ('original')"
        )
    if config.pixel_hint_channels is not None:  # diffusers packs the hint's 2x2 patches by patch_size
        out.update(conditioning_embedding_channels=config.pixel_hint_channels, patch_size=2)
    if config.extra_condition_channels:  # Alimama's config name
        out["extra_condition_channels"] = config.extra_condition_channels
    return out


def _describe_flux(transformer: dict[str, Any], config: FluxControlNetConfig) -> dict[str, Any]:
    # the condition as the VAE's latents, or as pixels through a hint encoder scaling it down
    pixels = config.pixel_hint_channels is not None
    return {
        "double_blocks": config.num_layers,
        "single_blocks": config.num_single_layers,
        "union_modes": config.num_mode,
        "guidance_input": bool(transformer.get("guidance_embeds", False)),
        "in_channels": transformer.get("in_channels", 64),
        "inpainting": config.extra_condition_channels > 0,
        "condition": f"pixels, {config.pixel_hint_scale}x" if pixels else "latents",
    }


# ------------------------------------------------------------------------------------ SD3 / SD3.5
def _inferred_sd3(tf: TensorFile) -> tuple[dict[str, Any], SD3ControlNetConfig]:
    inner, channels_in, patch, _ = _shape(tf, "pos_embed_input.proj.weight")
    own = "pos_embed.proj.weight" in tf
    reads_text = "context_embedder.weight" in tf
    # without its own patch embedding the latents' channels are not in the tensors: every such
    # published ControlNet (SD3.5 Large's) reads the latents alone, no extra channel
    channels = _shape(tf, "pos_embed.proj.weight")[1] if own else channels_in
    if inner % SD3_HEAD:
        raise CheckpointError(f"{tf.path}: width {inner} is not a multiple of SD3's {SD3_HEAD}-channel heads")
    transformer: dict[str, Any] = {
        "patch_size": patch,
        "in_channels": channels,
        "attention_head_dim": SD3_HEAD,
        "num_attention_heads": inner // SD3_HEAD,
        "pooled_projection_dim": _shape(tf, "time_text_embed.text_embedder.linear_1.weight")[1],
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in tf else None,
    }
    if own:
        positions = _shape(tf, "pos_embed.pos_embed")[1]
        side = math.isqrt(positions)
        transformer.update(pos_embed_max_size=side, sample_size=side)
    if reads_text:
        caption, joint = _shape(tf, "context_embedder.weight")
        transformer.update(joint_attention_dim=joint, caption_projection_dim=caption)
        transformer["dual_attention_layers"] = numbered(
            tf.shapes, r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight"
        )
    config = SD3ControlNetConfig(
        num_layers=_count(tf, r"transformer_blocks\.(\d+)\."),
        extra_conditioning_channels=channels_in - channels,
        own_pos_embed=own,
        reads_text=reads_text,
        zero_pooled=reads_text,
    )
    return transformer, config


def _sd3_from_diffusers(config: dict[str, Any]) -> SD3ControlNetConfig:
    return SD3ControlNetConfig(
        num_layers=int(config.get("num_layers", 18)),
        extra_conditioning_channels=int(config.get("extra_conditioning_channels", 0)),
        own_pos_embed=bool(config.get("use_pos_embed", True)),
        reads_text=config.get("joint_attention_dim", 4096) is not None,
        zero_pooled=bool(config.get("force_zeros_for_pooled_projection", True)),
    )


def _sd3_to_diffusers(config: SD3ControlNetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "num_layers": config.num_layers,
        "extra_conditioning_channels": config.extra_conditioning_channels,
        "use_pos_embed": config.own_pos_embed,
        "force_zeros_for_pooled_projection": config.zero_pooled,
    }
    if not config.reads_text:
        out["joint_attention_dim"] = None
    return out


def _describe_sd3(transformer: dict[str, Any], config: SD3ControlNetConfig) -> dict[str, Any]:
    return {
        "blocks": config.num_layers,
        "reads_text": config.reads_text,
        "own_patch_embedding": config.own_pos_embed,
        "extra_condition_channels": config.extra_conditioning_channels,
        "zero_pooled": config.zero_pooled,
    }


# ------------------------------------------------------------------------------------ Qwen-Image
def _inferred_qwen(tf: TensorFile) -> tuple[dict[str, Any], QwenImageControlNetConfig]:
    inner, channels = _shape(tf, "img_in.weight")
    head = _shape(tf, "transformer_blocks.0.attn.norm_q.weight")[0]
    if head != QWEN_HEAD:
        raise ValueError(
            f"heads of {head} channels: a file without a config implies Qwen-Image's {QWEN_HEAD}-channel "
            "heads (their rotary split); give the ControlNet's diffusers folder"
        )
    transformer = {
        "patch_size": 2,
        "in_channels": channels,
        "out_channels": channels // 4,  # 2x2 patches of the latents
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": _shape(tf, "txt_in.weight")[1],
        "axes_dims_rope": list(QWEN_AXES),
    }
    config = QwenImageControlNetConfig(
        num_layers=_count(tf, r"transformer_blocks\.(\d+)\."),
        extra_condition_channels=_shape(tf, "controlnet_x_embedder.weight")[1] - channels,
    )
    return transformer, config


def _qwen_from_diffusers(config: dict[str, Any]) -> QwenImageControlNetConfig:
    return QwenImageControlNetConfig(
        num_layers=int(config.get("num_layers", 60)),
        extra_condition_channels=int(config.get("extra_condition_channels", 0)),
    )


def _qwen_to_diffusers(config: QwenImageControlNetConfig) -> dict[str, Any]:
    return {"num_layers": config.num_layers, "extra_condition_channels": config.extra_condition_channels}


def _describe_qwen(transformer: dict[str, Any], config: QwenImageControlNetConfig) -> dict[str, Any]:
    return {
        "blocks": config.num_layers,
        "extra_condition_channels": config.extra_condition_channels,
        "inpainting": config.extra_condition_channels > 0,
    }


SPECS = {
    "flux": CNSpec(
        "flux",
        "Flux.1",
        "FluxControlNetModel",
        FluxControlNet,
        FluxControlNetConfig,
        FLUX_FIELDS,
        ("controlnet_x_embedder.weight", "x_embedder.weight", "context_embedder.weight"),
        _inferred_flux,
        _flux_from_diffusers,
        _flux_to_diffusers,
        _describe_flux,
    ),
    "sd3": CNSpec(
        "sd3",
        "SD3",
        "SD3ControlNetModel",
        SD3ControlNet,
        SD3ControlNetConfig,
        SD3_FIELDS,
        (
            "pos_embed_input.proj.weight",
            "controlnet_blocks.0.weight",
            "time_text_embed.text_embedder.linear_1.weight",
        ),
        _inferred_sd3,
        _sd3_from_diffusers,
        _sd3_to_diffusers,
        _describe_sd3,
    ),
    "qwenimage": CNSpec(
        "qwenimage",
        "Qwen-Image",
        "QwenImageControlNetModel",
        QwenImageControlNet,
        QwenImageControlNetConfig,
        QWEN_FIELDS,
        ("img_in.weight", "txt_norm.weight", "controlnet_x_embedder.weight"),
        _inferred_qwen,
        _qwen_from_diffusers,
        _qwen_to_diffusers,
        _describe_qwen,
    ),
    "zimage": CNSpec(
        "zimage",
        "Z-Image",
        "ZImageControlNetModel",
        ZImageControlNet,
        ZImageControlNetConfig,
        ZIMAGE_FIELDS,
        zimage_controlnet.MARKERS,
        zimage_controlnet.inferred,
        zimage_controlnet.from_diffusers,
        zimage_controlnet.to_diffusers,
        zimage_controlnet.describe,
    ),
}
_BY_CLASS = {spec.model: spec for spec in SPECS.values()}


def spec_of(path: Path, tf: TensorFile | None) -> CNSpec | None:
    """The family of a transformer ControlNet folder (by its config.json) or file (our metadata,
    else its keys), or None."""
    if tf is None:
        cfg = path / "config.json"
        if not cfg.is_file():
            return None
        name = read_json(cfg).get("_class_name")
        return next((s for s in SPECS.values() if s.class_name == name), None)
    stored = tf.metadata.get("family")
    if stored in SPECS and tf.metadata.get(META_FORMAT, "controlnet") == "controlnet":
        return SPECS[stored]
    if xlabs_controlnet.is_xlabs(tf):
        return SPECS["flux"]
    return next((s for s in SPECS.values() if all(k in tf for k in s.markers)), None)


def _stored(spec: CNSpec, tf: TensorFile) -> tuple[dict[str, Any], Any] | None:
    raw_t, raw_c = tf.metadata.get("transformer_config"), tf.metadata.get("controlnet_config")
    if raw_t is None or raw_c is None:
        return None
    try:
        return dict(json.loads(raw_t)), spec.config.from_dict(json.loads(raw_c))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{tf.path}: stored {spec.label} ControlNet config is invalid ({e})") from None


def arch(spec: CNSpec, tf: TensorFile) -> tuple[dict[str, Any], Any]:
    """(transformer config, ControlNet config): stored in our files, else read off the tensors."""
    stored = _stored(spec, tf)
    if stored is not None:
        return stored
    try:
        return xlabs_controlnet.inferred(tf) if xlabs_controlnet.is_xlabs(tf) else spec.inferred(tf)
    except CheckpointError:  # (names the file already)
        raise
    except ValueError as e:
        raise CheckpointError(f"{tf.path}: {e}") from None


def folder_arch(spec: CNSpec, folder: Path) -> tuple[dict[str, Any], Any]:
    config = read_json(folder / "config.json")
    if config.get("conditioning_embedding_channels") is not None:  # its patch_size is the hint's
        config = {**config, "patch_size": 1}
    try:
        return {k: config[k] for k in spec.fields if k in config}, spec.from_diffusers(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def _build(spec: CNSpec, transformer: dict[str, Any], config: Any, where: str) -> Any:
    try:
        return spec.model(transformer, config, device="meta")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a usable {spec.label} ControlNet config ({e})") from None


def load_file(spec: CNSpec, tf: TensorFile, *, dtype: torch.dtype | None = None) -> Any:
    cn = _build(spec, *arch(spec, tf), str(tf.path))
    rules: Callable[[list[str]], list[Rule]] = identity_rules
    if xlabs_controlnet.is_xlabs(tf):
        inner, convs = cn.inner_dim, len(cn.input_hint_block.blocks)
        rules = lambda keys: xlabs_controlnet.rules(keys, inner, convs)  # noqa: E731
    return load_into(cn, tf, rules, present=tf.keys(), what=f"{spec.label} ControlNet", dtype=dtype)


def load_folder(spec: CNSpec, folder: Path, *, dtype: torch.dtype | None = None) -> Any:
    from .diffusers import open_weights

    cn = _build(spec, *folder_arch(spec, folder), str(folder))
    tf = open_weights(folder, WEIGHTS)
    return load_into(cn, tf, identity_rules, present=tf.keys(), what=f"{spec.label} ControlNet", dtype=dtype)


def _metadata(spec: CNSpec, cn: Any) -> dict[str, str]:
    return {
        "family": spec.family,
        "transformer_config": json.dumps(cn.transformer_config, sort_keys=True),
        "controlnet_config": json.dumps(cn.config.to_dict(), sort_keys=True),
    }


def diffusers_config(cn: Any) -> dict[str, Any]:
    """The config.json of ``cn`` in the 'diffusers' layout: what diffusers' class of it is built from."""
    spec = _BY_CLASS[type(cn)]
    config = {"_class_name": spec.class_name, "_diffusers_version": diffusers.__version__}
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in cn.transformer_config.items()})
    config.update(spec.to_diffusers(cn.config))
    return config


def save(cn: Any, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """``fmt``: 'controlnet' (ours), 'original' (the published single file: the same tensors, no
    config) or 'diffusers' (a folder)."""
    spec = _BY_CLASS[type(cn)]
    state = {k: v.contiguous() for k, v in cn.state_dict().items()}
    if fmt == "diffusers":
        config = diffusers_config(cn)
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            tmp.mkdir()
            (tmp / "config.json").write_text(dump_json(config))
            save_safetensors(state, tmp / f"{WEIGHTS}.safetensors", {"format": "pt", **_metadata(spec, cn)})
        return [path]
    meta = {"format": "pt"}
    if fmt == "controlnet":
        meta = {META_FORMAT: "controlnet", META_VERSION: FORMAT_VERSION, **_metadata(spec, cn)}
    elif getattr(cn.config, "pixel_hint_channels", None) is not None:  # XLabs' own layout
        state = xlabs_controlnet.to_xlabs(cn, state)
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        save_safetensors(state, tmp, meta)
    return [path]


def describe(spec: CNSpec, transformer: dict[str, Any], config: Any) -> dict[str, Any]:
    """What ``inspect`` says of a transformer ControlNet's options."""
    return spec.describe(transformer, config)
