"""diffusers' folder layout, read and written without diffusers' loaders (offline, verified).

ControlNet folder (what ``diffusers.ControlNetModel.from_pretrained`` reads)::

    config.json                           ControlNetModel arguments: the UNet encoder's fields,
                                          conditioning_channels, conditioning_embedding_out_channels,
                                          global_pool_conditions
    diffusion_pytorch_model.safetensors   our ControlNet's state dict as is (same module names)

Base model folder (a pipeline)::

    model_index.json
    unet/ vae/          config.json + diffusion_pytorch_model.safetensors
    text_encoder/       config.json + model.safetensors (``text_model.*`` names)
    text_encoder_2/     SDXL only
    tokenizer/ tokenizer_2/ scheduler/

Weights may also be ``.bin`` pickles or sharded (``*.index.json``). The family of a pipeline is
SDXL when it has a second text encoder and a text-time UNet; otherwise the tokenizer's padding
token tells OpenCLIP (SD2.x, '!') from CLIP (SD1.x).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..families.sd.adapter import AdapterConfig, T2IAdapter
from ..families.sd.base import DEFAULT_SCHEDULE, UNetBase
from ..families.sd.configs import Family
from ..families.sd.controlnet import ControlNet, ControlNetConfig
from ..families.sd.union import UnionConfig, UnionControlNet
from ..text.tokenizer import _vocab_and_merges
from .build import (
    TEXT_FIELDS,
    UNET_FIELDS,
    BaseConfig,
    Loader,
    build_controlnet,
    build_union,
    controlnet_metadata,
    hint_config_from_shapes,
    numbered,
    public_config,
    shape_of,
    stored_controlnet_arch,
    text_config_of,
    text_file_prefix,
    text_key_prefix,
)
from .checkpoint import (
    CheckpointError,
    TensorFile,
    atomic_outputs,
    dump_json,
    open_sharded,
    open_tensors,
    read_json,
    save_safetensors,
)
from .infer import unet_config_diffusers_names
from .keymap import identity_rules, load_into

__all__ = [
    "base_loader",
    "is_controlnet_folder",
    "is_pipeline_folder",
    "load_controlnet",
    "load_controlnet_file",
    "save_base",
    "save_controlnet",
]

WEIGHTS = "diffusion_pytorch_model"
TEXT_WEIGHTS = "model"


def is_controlnet_folder(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and read_json(cfg).get("_class_name") in (
        "ControlNetModel",
        "ControlNetXSAdapter",
        "ControlNetUnionModel",
    )


def is_adapter_folder(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and read_json(cfg).get("_class_name") == "T2IAdapter"


def load_adapter(folder: Path, *, dtype: torch.dtype | None = None) -> T2IAdapter:
    """A diffusers ``T2IAdapter`` folder (TencentARC's published adapters): its config, then its
    weights key for key."""
    try:
        with torch.device("meta"):  # the file's tensors are assigned: no second copy
            adapter = T2IAdapter(AdapterConfig.from_dict(read_json(folder / "config.json")))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a usable T2I-Adapter config ({e})") from e
    tf = open_weights(folder, WEIGHTS)
    load_into(adapter, tf, identity_rules, present=tf.keys(), what="T2I-Adapter", dtype=dtype)
    return adapter


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def open_weights(folder: Path, stem: str) -> TensorFile:
    """``stem``.safetensors, its shard index, the fp16 variant, ``stem``.bin or its shard index, in
    that order (a folder fetched with ``variant="fp16"`` holds only ``stem``.fp16.safetensors)."""
    for name in (
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{stem}.fp16.safetensors",
        f"{stem}.bin",
        f"{stem}.bin.index.json",
        f"{stem}.fp16.bin",
    ):
        p = folder / name
        if p.is_file():
            return open_sharded(p) if name.endswith(".index.json") else open_tensors(p)
    raise CheckpointError(f"{folder}: no weights ({stem}.safetensors or {stem}.bin)")


def _versioned(class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}


# ------------------------------------------------------------------------------------ ControlNet
def controlnet_arch(config: dict[str, Any]) -> tuple[dict[str, Any], ControlNetConfig]:
    """(UNet config, ControlNetConfig) from a ControlNetModel ``config.json``. Only the encoder
    half of the UNet config matters to a ControlNet; the decoder's block types are the mirror."""
    unet = {k: config[k] for k in UNET_FIELDS if k in config}
    down = list(unet.get("down_block_types", ()))
    unet["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
    hint = ControlNetConfig(
        hint_channels=int(config.get("conditioning_channels", 3)),
        hint_block_channels=tuple(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        global_pool=bool(config.get("global_pool_conditions", False)),
    )
    return unet, hint


def load_controlnet(folder: Path, *, dtype: torch.dtype | None = None) -> ControlNet:
    """A ControlNetModel folder, or a ControlNetUnionModel one (SDXL Union ControlNets)."""
    config = read_json(folder / "config.json")
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError(f"{folder}: only RGB-ordered conditions are supported")
    unet_config, hint = controlnet_arch(config)
    tf = open_weights(folder, WEIGHTS)
    try:
        if config.get("_class_name") == "ControlNetUnionModel":
            cn = build_union(unet_config, hint, union_arch(tf, config))
        else:
            cn = build_controlnet(unet_config, hint)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a usable ControlNet config ({e})") from e
    load_into(cn, tf, identity_rules, present=tf.keys(), what="ControlNet", dtype=dtype)
    return cn


def file_controlnet_arch(
    tf: TensorFile, unet_config: dict[str, Any] | None = None, config: ControlNetConfig | None = None
) -> tuple[dict[str, Any], ControlNetConfig]:
    """Architecture of diffusers-layout ControlNet weights without their config.json (a single
    file, as many SDXL ControlNets are shared): the caller's, the stored one, or read off shapes."""
    stored = stored_controlnet_arch(tf)
    if stored is not None:
        unet_config, config = unet_config or stored[0], config or stored[1]
    if unet_config is None:
        unet_config = unet_config_diffusers_names(tf.shapes, str(tf.path))
    if config is None:
        blocks = numbered(tf.shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
        names = [
            f"controlnet_cond_embedding.{n}"
            for n in ("conv_in", *(f"blocks.{i}" for i in blocks), "conv_out")
        ]
        config = hint_config_from_shapes(tf.shapes, names)
    return unet_config, config


def union_arch(tf: TensorFile, config: Mapping[str, Any] | None = None) -> UnionConfig:
    """A Union ControlNet's own fields read off its tensors (kinds, widths, mixing layers), the
    attention heads from ``config`` (a ControlNetUnionModel config.json) or xinsir's 8. The tensors
    win over the config: xinsir publishes ProMax's weights (8 kinds) beside Union's config (6)."""
    where = str(tf.path)
    kinds, width = shape_of(tf.shapes, "task_embedding", where)
    proj = shape_of(tf.shapes, "spatial_ch_projs.weight", where)[0]
    layers = len(numbered(tf.shapes, r"transformer_layes\.(\d+)\..*"))
    heads = int((config or {}).get("num_trans_head", UnionConfig.num_trans_head))
    return UnionConfig(kinds, width, heads, layers, proj)


def is_union_file(tf: TensorFile) -> bool:
    """Whether diffusers-layout weights are an SDXL Union ControlNet's (its task embedding)."""
    return "task_embedding" in tf and "controlnet_cond_embedding.conv_in.weight" in tf


def load_controlnet_file(
    tf: TensorFile,
    *,
    unet_config: dict[str, Any] | None = None,
    config: ControlNetConfig | None = None,
    dtype: torch.dtype | None = None,
) -> ControlNet:
    """diffusers-layout ControlNet weights without their config.json (a Union ControlNet's too:
    xinsir's ``diffusion_pytorch_model_promax.safetensors`` given as a file)."""
    if is_union_file(tf):  # its config.json beside it, where there is one (xinsir's repository)
        beside = tf.path.parent / "config.json"
        stored = read_json(beside) if beside.is_file() else {}
        if stored.get("_class_name") != "ControlNetUnionModel":
            stored = {}
        elif unet_config is None and config is None:
            unet_config, config = controlnet_arch(stored)
        union = union_arch(tf, stored or None)
        cn: ControlNet = build_union(*file_controlnet_arch(tf, unet_config, config), union)
        return load_into(cn, tf, identity_rules, present=list(tf), what="ControlNet", dtype=dtype)
    cn = build_controlnet(*file_controlnet_arch(tf, unet_config, config))
    return load_into(cn, tf, identity_rules, present=list(tf), what="ControlNet", dtype=dtype)


def save_controlnet(cn: ControlNet, folder: Path, *, overwrite: bool = False) -> list[Path]:
    config = {k: cn.unet_config[k] for k in UNET_FIELDS if k in cn.unet_config}
    config.update(
        conditioning_channels=cn.config.hint_channels,
        conditioning_embedding_out_channels=list(cn.config.hint_block_channels),
        global_pool_conditions=cn.config.global_pool,
        controlnet_conditioning_channel_order="rgb",
    )
    kind = "ControlNetModel"
    if isinstance(cn, UnionControlNet):
        kind = "ControlNetUnionModel"
        config.update(cn.union.to_dict())
    with atomic_outputs(folder, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        (tmp / "config.json").write_text(dump_json(_versioned(kind, config)))
        metadata = {"format": "pt", **controlnet_metadata(cn.unet_config, cn.config)}
        save_safetensors(cn.state_dict(), tmp / f"{WEIGHTS}.safetensors", metadata)
    return [folder]


# ------------------------------------------------------------------------------------ base model
def _pad_token(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = folder / "tokenizer" / name
        if p.is_file():
            pad = read_json(p).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


def _family(folder: Path, unet: dict[str, Any], text: dict[str, Any]) -> Family:
    if (folder / "text_encoder_2").is_dir() and unet.get("addition_embed_type") == "text_time":
        return Family.SDXL
    pad = _pad_token(folder)
    if pad is not None:
        return Family.SD2 if pad == "!" else Family.SD1
    by_width = {768: Family.SD1, 1024: Family.SD2}.get(text.get("hidden_size", 0))
    if by_width is None:
        raise CheckpointError(f"{folder}: cannot tell SD1.x from SD2.x (no tokenizer folder); pass family=")
    return by_width


def _text_config(path: Path) -> dict[str, Any]:
    """The network-shaping fields of a transformers CLIP config, and its class."""
    cfg = read_json(path / "config.json")
    return {
        **{k: cfg[k] for k in TEXT_FIELDS if k in cfg},
        "architectures": cfg.get("architectures") or ["CLIPTextModel"],
    }


def base_config(folder: Path, family: Family | None = None) -> BaseConfig:
    index = read_json(folder / "model_index.json")
    missing = [p for p in ("unet", "vae", "text_encoder") if p not in index or not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(f"{folder}: pipeline folder lacks {', '.join(missing)}")
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    text = _text_config(folder / "text_encoder")
    text2 = _text_config(folder / "text_encoder_2") if (folder / "text_encoder_2").is_dir() else None
    schedule = dict(DEFAULT_SCHEDULE)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        stored = read_json(sched_path)
        schedule.update({k: stored[k] for k in DEFAULT_SCHEDULE if k in stored})
    family = family or _family(folder, unet, text)
    return BaseConfig(family, public_config(unet), public_config(vae), text, text2, schedule)


def base_loader(
    folder: Path, *, family: Family | None = None, dtype: torch.dtype | None = None
) -> tuple[BaseConfig, Loader]:
    """The pipeline's architecture and a function that fills one part of it."""
    config = base_config(folder, family)

    def load(part: str, module: torch.nn.Module) -> torch.nn.Module:
        tf = open_weights(folder / part, TEXT_WEIGHTS if part.startswith("text_encoder") else WEIGHTS)
        canonical = text_file_prefix(module, tf.keys()) if part.startswith("text_encoder") else ""
        # transformers 4.x kept position_ids in the state dict; they are recomputed, not loaded
        present = [k for k in tf if not k.endswith("embeddings.position_ids")]
        return load_into(
            module, tf, lambda ks: identity_rules(ks, canonical), present=present, what=part, dtype=dtype
        )

    return config, load


def _write_tokenizer(base: UNetBase, folder: Path, second: bool) -> None:
    """The tokenizer as transformers 5 saves it, plus vocab.json / merges.txt for readers that
    build the BPE tokenizer from those two files (transformers 4.x, other tools)."""
    tok = base.tokenizer_2 if second else base.tokenizer
    assert tok is not None
    tok.save_pretrained(str(folder))
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(dump_json({**specials, "pad_token": tok.pad_token}))


def save_base(base: UNetBase, folder: Path, *, overwrite: bool = False) -> list[Path]:
    xl = base.family is Family.SDXL
    index: dict[str, Any] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", type(base.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if xl:
        assert base.text_encoder_2 is not None
        index.update(
            text_encoder_2=["transformers", type(base.text_encoder_2).__name__],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        index.update(
            safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
        )
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    # SD's DDIM settings; the training schedule itself is the model's
    scheduler = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, **base.schedule}
    with atomic_outputs(folder, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        (tmp / "model_index.json").write_text(dump_json(_versioned(pipeline, index)))
        for part, module in base.modules().items():
            (tmp / part).mkdir()
            if part.startswith("text_encoder"):
                cfg = {**module.config.to_dict(), **text_config_of(module)}
                canonical = text_key_prefix(module)
                state = {canonical + k: v for k, v in module.state_dict().items()}
                (tmp / part / "config.json").write_text(dump_json(cfg))
                save_safetensors(state, tmp / part / f"{TEXT_WEIGHTS}.safetensors", {"format": "pt"})
            else:
                cfg = public_config(module.config)
                (tmp / part / "config.json").write_text(dump_json(_versioned(type(module).__name__, cfg)))
                save_safetensors(module.state_dict(), tmp / part / f"{WEIGHTS}.safetensors", {"format": "pt"})
        for sub, second in (("tokenizer", False), ("tokenizer_2", True)) if xl else (("tokenizer", False),):
            (tmp / sub).mkdir()
            _write_tokenizer(base, tmp / sub, second)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            dump_json(_versioned("DDIMScheduler", scheduler))
        )
    return [folder]
