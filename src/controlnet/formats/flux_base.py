"""Flux.1 base models: diffusers' pipeline folder and our single file, read offline, key by key.

**diffusers folder** (what ``FluxPipeline.save_pretrained`` writes and the hub holds)::

    model_index.json          transformer: FluxTransformer2DModel
    transformer/ vae/         config.json + diffusion_pytorch_model(.safetensors | shards + index)
    text_encoder/             CLIP-L (config.json + model.safetensors)
    text_encoder_2/           T5 encoder (config.json + model shards + index); T5 ties its input
                              embedding to ``shared.weight``, which is all a file may hold
    tokenizer/                CLIP's BPE: the package's own copy is used (the same vocabulary)
    tokenizer_2/              T5's tokenizer: ``tokenizer.json`` (read with the ``tokenizers``
                              package) or ``spiece.model`` (needs ``sentencepiece``)
    scheduler/                the flow-matching shift settings

**ours**: one safetensors file, parts under ``transformer.``, ``vae.``, ``text_encoder.``,
``text_encoder_2.``, with ``family: flux``, every part's config, the schedule and T5's tokenizer
(its ``tokenizer.json`` text) in the metadata, so it loads alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ..families.flux.base import FluxBase
from ..families.flux.schedule import FLUX_SCHEDULE
from ..families.sd.configs import Family
from ..text.tokenizer import clip_tokenizer
from .build import (
    FORMAT_VERSION,
    META_FORMAT,
    META_VERSION,
    build_text_encoder,
    public_config,
    text_config_of,
    text_file_prefix,
    text_key_prefix,
)
from .checkpoint import (
    CheckpointError,
    TensorFile,
    atomic_outputs,
    dump_json,
    read_json,
    save_safetensors,
)
from .keymap import Rule, load_into

__all__ = [
    "build_part",
    "fill_part",
    "is_flux_base_file",
    "is_flux_pipeline",
    "load_file",
    "load_folder",
    "save",
    "t5_tokenizer",
]

FAMILY = "flux"
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TIED = ("encoder.embed_tokens.weight", "shared.weight")  # T5's input embedding and what it ties to
TOKENIZER_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def is_flux_pipeline(folder: Path) -> bool:
    index = folder / "model_index.json"
    return (
        index.is_file()
        and (read_json(index).get("transformer") or [None, None])[1] == "FluxTransformer2DModel"
    )


def is_flux_base_file(tf: TensorFile) -> bool:
    return tf.metadata.get("family") == FAMILY and tf.metadata.get(META_FORMAT) == "base"


# ------------------------------------------------------------------------------------ building
def build_part(part: str, config: dict[str, Any], where: str) -> torch.nn.Module:
    try:
        if part == "transformer":
            with torch.device("meta"):
                return FluxTransformer2DModel.from_config(config)
        if part == "vae":
            with torch.device("meta"):
                return AutoencoderKL.from_config(config)
        if part == "text_encoder":
            return build_text_encoder(config)
        with torch.device("meta"):
            return T5EncoderModel(T5Config(**config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a usable {part} config ({e})") from None


def _rules(part: str, module: torch.nn.Module, tf: TensorFile, prefix: str = ""):
    canonical = text_file_prefix(module, tf.keys(), prefix) if part == "text_encoder" else ""

    def rules(keys: list[str]) -> list[Rule]:
        out = []
        for k in keys:
            name = prefix + canonical + k
            if part == "text_encoder_2" and k == TIED[0] and name not in tf:
                name = prefix + TIED[1]  # the tied embedding, stored once
            out.append(Rule(k, name))
        return out

    return rules


def fill_part(part: str, module: torch.nn.Module, tf: TensorFile, prefix: str, dtype: torch.dtype | None):
    present = [k for k in tf.with_prefix(prefix) if not k.endswith("embeddings.position_ids")]
    if not present:
        raise CheckpointError(f"{tf.path}: has no {part} ({prefix or part + '/'}* keys)")
    return load_into(module, tf, _rules(part, module, tf, prefix), present=present, what=part, dtype=dtype)


def _tokenizer_from_json(text: str, where: str) -> PreTrainedTokenizerFast:
    try:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **TOKENIZER_SPECIALS)
    except Exception as e:  # the tokenizers package's own error types
        raise CheckpointError(f"{where}: not a readable tokenizer ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------ folders
def t5_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tj = folder / "tokenizer.json"
    if tj.is_file():
        return _tokenizer_from_json(tj.read_text(), str(tj))
    if (folder / "spiece.model").is_file():
        try:
            from transformers import T5TokenizerFast

            return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # sentencepiece missing, or a damaged model file
            raise CheckpointError(
                f"{folder}: cannot read spiece.model ({type(e).__name__}); install sentencepiece, or "
                "give the folder a tokenizer.json"
            ) from None
    raise CheckpointError(f"{folder}: no T5 tokenizer (tokenizer.json or spiece.model)")


def _folder_config(folder: Path, part: str) -> dict[str, Any]:
    if not (folder / part / "config.json").is_file():
        raise CheckpointError(f"{folder}: Flux pipeline folder lacks {part}/config.json")
    cfg = read_json(folder / part / "config.json")
    if part == "text_encoder":
        from .diffusers import _text_config

        return _text_config(folder / part)
    return {k: v for k, v in cfg.items() if not k.startswith("_")} if part != "text_encoder_2" else cfg


def _schedule(stored: dict[str, Any]) -> dict[str, Any]:
    return {**FLUX_SCHEDULE, **{k: stored[k] for k in FLUX_SCHEDULE if k in stored}}


def load_folder(folder: Path, *, dtype: torch.dtype | None = None) -> FluxBase:
    from .diffusers import open_weights

    parts = {}
    for part in PARTS:
        module = build_part(part, _folder_config(folder, part), str(folder / part / "config.json"))
        tf = open_weights(
            folder / part, "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
        )
        parts[part] = fill_part(part, module, tf, "", dtype)
    sched = folder / "scheduler" / "scheduler_config.json"
    schedule = _schedule(read_json(sched) if sched.is_file() else {})
    return FluxBase(
        parts["transformer"],
        parts["vae"],
        parts["text_encoder"],
        parts["text_encoder_2"],
        clip_tokenizer(Family.SD1),
        t5_tokenizer(folder / "tokenizer_2"),
        schedule=schedule,
    )


# ------------------------------------------------------------------------------------ our file
def _meta_json(tf: TensorFile, key: str) -> Any:
    raw = tf.metadata.get(key)
    if raw is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks {key!r}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tf.path}: metadata entry {key!r} is not JSON ({e})") from None


def load_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> FluxBase:
    configs = _meta_json(tf, "base_config")
    if not isinstance(configs, dict) or any(not isinstance(configs.get(p), dict) for p in PARTS):
        raise CheckpointError(
            f"{tf.path}: metadata 'base_config' must hold a config for each of {', '.join(PARTS)}"
        )
    parts = {p: fill_part(p, build_part(p, configs[p], str(tf.path)), tf, p + ".", dtype) for p in PARTS}
    tokenizer = tf.metadata.get("tokenizer_2")
    if tokenizer is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks 'tokenizer_2' (T5's tokenizer)")
    return FluxBase(
        parts["transformer"],
        parts["vae"],
        parts["text_encoder"],
        parts["text_encoder_2"],
        clip_tokenizer(Family.SD1),
        _tokenizer_from_json(tokenizer, str(tf.path)),
        max_sequence_length=int(configs.get("max_sequence_length", 512)),
        schedule=_schedule(configs.get("schedule") or {}),
    )


def _configs(base: FluxBase) -> dict[str, Any]:
    return {
        "transformer": public_config(base.transformer.config),
        "vae": public_config(base.vae.config),
        "text_encoder": text_config_of(base.text_encoder),
        "text_encoder_2": base.text_encoder_2.config.to_dict(),
        "schedule": dict(base.schedule),
        "max_sequence_length": base.max_sequence_length,
    }


def save(base: FluxBase, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Our single file ('controlnet') or a diffusers pipeline folder ('diffusers')."""
    configs = _configs(base)
    tokenizer = base.tokenizer_2.backend_tokenizer.to_str()
    if fmt == "controlnet":
        tensors = {}
        for part in PARTS:
            module = dict(base.modules())[part]
            canonical = text_key_prefix(module) if part == "text_encoder" else ""
            tensors.update({f"{part}.{canonical}{k}": v for k, v in module.state_dict().items()})
        tensors.pop("text_encoder_2." + TIED[0], None)  # tied to shared.weight: stored once
        meta = {
            META_FORMAT: "base",
            META_VERSION: FORMAT_VERSION,
            "family": FAMILY,
            "base_config": json.dumps(configs, sort_keys=True),
            "tokenizer_2": tokenizer,
        }
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            save_safetensors(tensors, tmp, meta)
        return [path]
    if fmt != "diffusers":
        raise ValueError(f"a Flux base model is written as 'controlnet' (ours) or 'diffusers', not {fmt!r}")
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        (tmp / "model_index.json").write_text(dump_json(index))
        for part, module in base.modules().items():
            (tmp / part).mkdir()
            state = dict(module.state_dict())
            if part == "text_encoder":
                canonical = text_key_prefix(module)
                state = {canonical + k: v for k, v in state.items()}
                cfg = {**module.config.to_dict(), **text_config_of(module)}
            elif part == "text_encoder_2":
                state.pop(TIED[0], None)
                cfg = {**module.config.to_dict(), "architectures": ["T5EncoderModel"]}
            else:
                cfg = {"_class_name": type(module).__name__, **public_config(module.config)}
            stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
            (tmp / part / "config.json").write_text(dump_json(cfg))
            save_safetensors(state, tmp / part / f"{stem}.safetensors", {"format": "pt"})
        (tmp / "tokenizer").mkdir()
        base.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "tokenizer_2").mkdir()
        (tmp / "tokenizer_2" / "tokenizer.json").write_text(tokenizer)
        (tmp / "tokenizer_2" / "special_tokens_map.json").write_text(dump_json(TOKENIZER_SPECIALS))
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", **base.schedule}
        (tmp / "scheduler" / "scheduler_config.json").write_text(dump_json(sched))
    return [path]
