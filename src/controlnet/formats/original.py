"""The original single-file layout: Stable Diffusion checkpoints and the released ControlNets.

One file, parts under prefixes (key names per part are in :mod:`.ldm`):

    model.diffusion_model.*              UNet
    first_stage_model.*                  VAE
    cond_stage_model.transformer.*       SD1.x text encoder (HF CLIP ViT-L/14)
    cond_stage_model.model.*             SD2.x text encoder (OpenCLIP ViT-H)
    conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*   SDXL's two encoders
    control_model.*                      ControlNet (v1.0 files: with all of the above; v1.1: alone)
    betas, alphas_cumprod, ...           schedule buffers (read for the beta range, not loaded)
    model_ema.*, denoiser.*              an EMA copy / sgm buffers: recognised, not loaded

Known entries a part holds but our modules do not: CLIP's ``position_ids`` (recomputed),
OpenCLIP's ``logit_scale`` (contrastive training only), and for SD2.x the last OpenCLIP layer and
``text_projection`` (SD2 conditions on the penultimate layer, see families.py). Any other key is an
error. The architecture is read off the tensors, with the original YAML (same-named ``.yaml`` or
``--config``) for what they cannot tell: see :mod:`.infer` and :mod:`.ldm_yaml`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from ..families.sd.base import UNetBase
from ..families.sd.configs import Family, family_of_unet_config
from ..families.sd.controlnet import ControlNet, ControlNetConfig
from .build import (
    BaseConfig,
    Loader,
    base_metadata,
    build_controlnet,
    controlnet_metadata,
    hint_config_from_shapes,
    numbered,
    stored_base_config,
    stored_controlnet_arch,
    text_key_prefix,
)
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, list_keys, save_safetensors
from .infer import (
    clip_config,
    openclip_config,
    unet_config_original_names,
    vae_config_original_names,
)
from .keymap import Rule, load_into, to_file
from .ldm import clip_rule, controlnet_rule, openclip_rule, unet_rule, vae_rule
from .ldm_yaml import LdmOptions, ldm_options

__all__ = [
    "base_loader",
    "base_tensors",
    "controlnet_tensors",
    "load_controlnet",
    "read_schedule",
    "save_base",
    "save_controlnet",
]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CONTROL = "control_model."
TEXT_SD1 = "cond_stage_model.transformer."
TEXT_SD2 = "cond_stage_model.model."
TEXT_XL1 = "conditioner.embedders.0.transformer."
TEXT_XL2 = "conditioner.embedders.1.model."
SCHEDULE_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
#: Prefixes recognised but never loaded, and what they are.
IGNORED = {"model_ema.": "an EMA copy of the UNet (not loaded)", "denoiser.": "sampler buffers (not loaded)"}
#: Part name -> prefix, in the order inspect lists them.
PREFIXES = {
    "unet": UNET,
    "vae": VAE,
    "text_encoder (CLIP ViT-L/14)": TEXT_SD1,
    "text_encoder (OpenCLIP ViT-H)": TEXT_SD2,
    "text_encoder (CLIP ViT-L/14, SDXL)": TEXT_XL1,
    "text_encoder_2 (OpenCLIP ViT-bigG)": TEXT_XL2,
    "controlnet": CONTROL,
}


def _reject_unknown(tf: TensorFile) -> None:
    known = (*PREFIXES.values(), *IGNORED)
    unknown = [k for k in tf if not k.startswith(known) and k not in SCHEDULE_KEYS]
    if unknown:
        raise CheckpointError(f"{tf.path}: unexpected keys ({len(unknown)}): {list_keys(unknown)}")


# ------------------------------------------------------------------------------------ ControlNet
def _hint_blocks(config: ControlNetConfig) -> int:
    return 2 * (len(config.hint_block_channels) - 1)


def _controlnet_rules(
    unet_config: dict[str, Any], config: ControlNetConfig
) -> Callable[[list[str]], list[Rule]]:
    return lambda keys: [controlnet_rule(k, unet_config, _hint_blocks(config), CONTROL) for k in keys]


def controlnet_arch(
    tf: TensorFile,
    unet_config: dict[str, Any] | None = None,
    config: ControlNetConfig | None = None,
    ldm_config: Path | None = None,
) -> tuple[dict[str, Any], ControlNetConfig]:
    """Architecture of a ``control_model.*`` ControlNet: the caller's, else the one stored in the
    file's metadata, else read off the tensors with the original YAML (``ldm_config``, else the
    same-named ``.yaml``) for what they cannot tell (see :mod:`.infer`)."""
    stored = stored_controlnet_arch(tf)
    if stored is not None:
        unet_config = unet_config or stored[0]
        config = config or stored[1]
    if unet_config is not None and config is not None:
        return unet_config, config
    options = ldm_options(tf.path, ldm_config)
    if unet_config is None:
        unet_config = unet_config_original_names(tf.shapes, CONTROL, str(tf.path), options)
    if config is None:
        pool = bool(options.control.get("global_average_pooling", False))
        idx = numbered(tf.shapes, re.escape(CONTROL) + r"input_hint_block\.(\d+)\.weight")
        if not idx:
            raise CheckpointError(
                f"{tf.path}: ControlNet has no hint encoder (control_model.input_hint_block.*)"
            )
        config = hint_config_from_shapes(tf.shapes, [f"{CONTROL}input_hint_block.{i}" for i in idx], pool)
    return unet_config, config


def load_controlnet(
    tf: TensorFile,
    *,
    unet_config: dict[str, Any] | None = None,
    config: ControlNetConfig | None = None,
    dtype: torch.dtype | None = None,
    ldm_config: Path | None = None,
) -> ControlNet:
    _reject_unknown(tf)
    keys = tf.with_prefix(CONTROL)
    if not keys:
        raise CheckpointError(f"{tf.path}: holds no ControlNet (no control_model.* keys)")
    unet_config, config = controlnet_arch(tf, unet_config, config, ldm_config)
    cn = build_controlnet(unet_config, config)
    load_into(cn, tf, _controlnet_rules(unet_config, config), present=keys, what="ControlNet", dtype=dtype)
    return cn


# ------------------------------------------------------------------------------------ base model
def _text_prefixes(family: Family) -> dict[str, str]:
    if family is Family.SDXL:
        return {"text_encoder": TEXT_XL1, "text_encoder_2": TEXT_XL2}
    return {"text_encoder": TEXT_SD2 if family is Family.SD2 else TEXT_SD1}


def _is_openclip(prefix: str) -> bool:
    return prefix in (TEXT_SD2, TEXT_XL2)


def _part_rules(
    part: str, prefix: str, config: BaseConfig, module: torch.nn.Module
) -> Callable[[list[str]], list[Rule]]:
    if part == "unet":
        return lambda keys: [unet_rule(k, config.unet, prefix) for k in keys]
    if part == "vae":
        return lambda keys: [vae_rule(k, config.vae, prefix) for k in keys]
    canonical = text_key_prefix(module)
    if _is_openclip(prefix):
        return lambda keys: [openclip_rule(k, prefix, canonical) for k in keys]
    return lambda keys: [clip_rule(k, prefix, canonical) for k in keys]


def _dropped(part: str, prefix: str, config: BaseConfig) -> Callable[[str], bool]:
    """File keys of a part that our module does not hold, by design (see the module docstring)."""
    if part == "text_encoder" and not _is_openclip(prefix):
        return lambda k: k == prefix + "text_model.embeddings.position_ids"
    if _is_openclip(prefix):
        text = config.text_encoder_2 if part == "text_encoder_2" else config.text_encoder
        assert text is not None
        projected = "CLIPTextModelWithProjection" in (text.get("architectures") or [])
        # SD2: the tower is built one layer short (the penultimate convention); SDXL keeps all
        extra = f"{prefix}transformer.resblocks.{text['num_hidden_layers']}."
        penultimate = part == "text_encoder" and config.family is Family.SD2
        return lambda k: (
            k in (prefix + "logit_scale", prefix + "attn_mask")
            or (not projected and k == prefix + "text_projection")
            or (penultimate and k.startswith(extra))
        )
    return lambda k: False


def read_schedule(tf: TensorFile, base: dict[str, Any], options: LdmOptions | None = None) -> dict[str, Any]:
    """The beta range and length from the stored ``betas`` (scaled-linear or linear), and the
    prediction type from the original YAML ('v' for the SD2.x 768-v models)."""
    schedule = dict(base)
    if "betas" in tf:
        betas = tf.get("betas").double()
        start, end, n = float(betas[0]), float(betas[-1]), betas.numel()
        scaled = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        linear = torch.linspace(start, end, n, dtype=torch.float64)
        if torch.allclose(betas, scaled, rtol=1e-4, atol=1e-8):
            kind = "scaled_linear"
        elif torch.allclose(betas, linear, rtol=1e-4, atol=1e-8):
            kind = "linear"
        else:
            raise CheckpointError(f"{tf.path}: betas follow neither a linear nor a scaled-linear schedule")
        # stored as float32: round away the representation error (0.00085 -> 0.0008500000112)
        schedule.update(
            num_train_timesteps=n,
            beta_start=float(f"{start:.6g}"),
            beta_end=float(f"{end:.6g}"),
            beta_schedule=kind,
        )
    if (options or ldm_options(tf.path)).parameterization == "v":
        schedule["prediction_type"] = "v_prediction"
    return schedule


def _family(tf: TensorFile, unet: dict[str, Any]) -> Family:
    """The family by its text encoders (the tokenizer and conditioning follow them), else by the
    UNet's structure."""
    if tf.with_prefix(TEXT_XL1) or tf.with_prefix(TEXT_XL2):
        return Family.SDXL
    if tf.with_prefix(TEXT_SD2):
        return Family.SD2
    if tf.with_prefix(TEXT_SD1):
        return Family.SD1
    return family_of_unet_config(unet)


def base_config(
    tf: TensorFile, config: BaseConfig | None = None, ldm_config: Path | None = None
) -> BaseConfig:
    """The caller's config, else the one stored in the file, else read off the tensors with the
    original YAML for what they cannot tell (see :mod:`.infer`)."""
    config = config or stored_base_config(tf)
    if config is not None:
        return config
    if not tf.with_prefix(UNET):
        raise CheckpointError(f"{tf.path}: holds no base model (no model.diffusion_model.* keys)")
    where, shapes = str(tf.path), tf.shapes
    options = ldm_options(tf.path, ldm_config)
    pooled = shapes.get(TEXT_XL2 + "text_projection", (0, None))[1]
    unet = unet_config_original_names(shapes, UNET, where, options, pooled=pooled)
    family = _family(tf, unet)
    config = BaseConfig.for_family(family)
    config.unet = unet
    # a part the file lacks keeps the family's config: loading it names what is missing
    if tf.with_prefix(VAE):
        config.vae = vae_config_original_names(shapes, VAE, family, where, options)
    elif options.scale_factor is not None:
        config.vae["scaling_factor"] = options.scale_factor
    first, second = (
        (TEXT_XL1, TEXT_XL2) if family is Family.SDXL else (_text_prefixes(family)["text_encoder"], None)
    )
    if tf.with_prefix(first):
        config.text_encoder = (
            openclip_config(shapes, first, family, where, second=False)
            if _is_openclip(first)
            else clip_config(shapes, first, family, where)
        )
    if second is not None and tf.with_prefix(second):
        config.text_encoder_2 = openclip_config(shapes, second, family, where, second=True)
    config.schedule = read_schedule(tf, config.schedule, options)
    return config


def base_loader(
    tf: TensorFile,
    *,
    config: BaseConfig | None = None,
    dtype: torch.dtype | None = None,
    ldm_config: Path | None = None,
) -> tuple[BaseConfig, Loader]:
    """The file's base model architecture and a function that fills one part of it."""
    _reject_unknown(tf)
    config = base_config(tf, config, ldm_config)
    prefixes = {"unet": UNET, "vae": VAE, **_text_prefixes(config.family)}

    def load(part: str, module: torch.nn.Module) -> torch.nn.Module:
        prefix = prefixes[part]
        keys = tf.with_prefix(prefix)
        if not keys:
            raise CheckpointError(
                f"{tf.path}: has no {part} ({prefix}* keys) for a {config.family.label} model"
            )
        drop = _dropped(part, prefix, config)
        present = [k for k in keys if not drop(k)]
        rules = _part_rules(part, prefix, config, module)
        return load_into(module, tf, rules, present=present, what=part, dtype=dtype)

    return config, load


# ------------------------------------------------------------------------------------ writing
def base_tensors(base: UNetBase) -> dict[str, torch.Tensor]:
    """A base model's tensors under the original names. SD2.x's last OpenCLIP layer and
    ``text_projection`` are not part of our model, so they are not written."""
    config = BaseConfig.of(base)
    prefixes = {"unet": UNET, "vae": VAE, **_text_prefixes(base.family)}
    out: dict[str, torch.Tensor] = {}
    for part, module in base.modules().items():
        state = module.state_dict()
        out.update(to_file(state, _part_rules(part, prefixes[part], config, module)(list(state))))
    return out


def controlnet_tensors(cn: ControlNet) -> dict[str, torch.Tensor]:
    """A ControlNet's tensors under the original ``control_model.*`` names."""
    state = cn.state_dict()
    return to_file(state, _controlnet_rules(cn.unet_config, cn.config)(list(state)))


def _cldm_yaml(unet_config: dict[str, Any], config: ControlNetConfig) -> str:
    """The v1.1 convention's sidecar: the ``control_stage_config`` of a cldm model (other tools
    build the network from it), written only for global pooling, the one option it carries."""
    widths = list(unet_config["block_out_channels"])
    kinds = list(unet_config["down_block_types"])
    heads = unet_config.get("num_attention_heads") or unet_config["attention_head_dim"]
    params: dict[str, Any] = {
        "image_size": 32,
        "in_channels": unet_config["in_channels"],
        "hint_channels": config.hint_channels,
        "model_channels": widths[0],
        "attention_resolutions": [2**i for i, k in enumerate(kinds) if k.startswith("CrossAttn")],
        "num_res_blocks": unet_config["layers_per_block"],
        "channel_mult": [w // widths[0] for w in widths],
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(unet_config.get("use_linear_projection")),
        "transformer_depth": unet_config.get("transformer_layers_per_block", 1),
        "context_dim": unet_config["cross_attention_dim"],
        "legacy": False,
        "global_average_pooling": config.global_pool,
    }
    if isinstance(heads, int):  # diffusers' "attention_head_dim" of SD1 is the number of heads
        params["num_heads"] = heads
    else:
        params["num_head_channels"] = widths[0] // heads[0]
    if family_of_unet_config(unet_config) is Family.SDXL:
        params["adm_in_channels"] = unet_config["projection_class_embeddings_input_dim"]
    doc = {
        "model": {"params": {"control_stage_config": {"target": "cldm.cldm.ControlNet", "params": params}}}
    }
    return "# ControlNet options beside the weights of the same name (v1.1 convention)\n" + yaml.safe_dump(
        doc
    )


def save_controlnet(
    cn: ControlNet, path: Path, *, base: UNetBase | None = None, overwrite: bool = False
) -> list[Path]:
    """``control_model.*`` (a v1.1-style file), or with ``base`` a whole v1.0-style file.
    Returns the paths written (the weights, and the ``.yaml`` for a global-pooling model)."""
    tensors = controlnet_tensors(cn)
    metadata = controlnet_metadata(cn.unet_config, cn.config)
    if base is not None:
        tensors.update(base_tensors(base))
        metadata.update(base_metadata(base))
    outputs = [path, path.with_suffix(".yaml")] if cn.config.global_pool else [path]
    with atomic_outputs(*outputs, overwrite=overwrite) as tmp:
        save_safetensors(tensors, tmp[0], metadata)
        if cn.config.global_pool:
            tmp[1].write_text(_cldm_yaml(cn.unet_config, cn.config))
    return outputs


def save_base(base: UNetBase, path: Path, *, overwrite: bool = False) -> list[Path]:
    with atomic_outputs(path, overwrite=overwrite) as tmp:
        save_safetensors(base_tensors(base), tmp[0], base_metadata(base))
    return [path]
