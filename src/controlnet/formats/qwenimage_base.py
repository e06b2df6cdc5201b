"""Qwen-Image base models: diffusers' pipeline folder and our single file, read offline, key by key.

**diffusers folder** (what ``QwenImagePipeline.save_pretrained`` writes and the hub holds)::

    model_index.json   transformer: QwenImageTransformer2DModel
    transformer/ vae/  config.json + diffusion_pytorch_model(.safetensors | shards + index)
    text_encoder/      Qwen2.5-VL: config.json + model(.safetensors | shards + index), under the
                       hub's names (model.layers.*, visual.*, lm_head.*) or transformers' own
                       (model.language_model.*, model.visual.*)
    tokenizer/         Qwen2's byte-level BPE (vocab.json + merges.txt and/or tokenizer.json),
                       read by transformers from the folder
    scheduler/         the flow-matching shift settings

**ours**: one safetensors file, each part under its name (``transformer.``, ``vae.``,
``text_encoder.``, the text encoder under the hub's names), with ``family``, every part's config,
the schedule and the tokenizer (its ``tokenizer.json`` text and special tokens) in the metadata,
so it loads alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig
from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

from ..families.qwenimage.base import QWEN_SCHEDULE, QwenImageBase
from .build import FORMAT_VERSION, META_FORMAT, META_VERSION, public_config
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, dump_json, read_json, save_safetensors
from .keymap import Rule, identity_rules, load_into, weights_on_meta

__all__ = ["FAMILY", "PIPELINE", "is_file", "is_folder", "load_file", "load_folder", "save"]

FAMILY = "qwenimage"
PIPELINE = "QwenImagePipeline"
PARTS = ("transformer", "vae", "text_encoder")
#: transformers' module names -> the names Qwen2.5-VL files use (the hub's, which transformers writes)
_HUB_NAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_EMBEDDING, _HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
_SPECIALS = ("pad_token", "eos_token", "bos_token", "unk_token")


def is_folder(folder: Path) -> bool:
    """Whether ``folder`` is a Qwen-Image diffusers pipeline folder (by its model_index.json)."""
    index = folder / "model_index.json"
    return index.is_file() and (read_json(index).get("transformer") or [None, None])[1] == (
        QwenImageTransformer2DModel.__name__
    )


def is_file(tf: TensorFile) -> bool:
    """Whether ``tf`` is a Qwen-Image base model in our single file."""
    return tf.metadata.get(META_FORMAT) == "base" and tf.metadata.get("family") == FAMILY


# ------------------------------------------------------------------------------------ parts
def _build(part: str, config: dict[str, Any], where: str) -> torch.nn.Module:
    """``part``'s module with its parameters on the meta device for :func:`_fill`."""
    try:
        with weights_on_meta():
            if part == "transformer":
                return QwenImageTransformer2DModel.from_config(config)
            if part == "vae":
                return AutoencoderKLQwenImage.from_config(config)
            return QwenVL(Qwen2_5_VLConfig.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: not a usable {part} config ({e})") from None


def _file_name(key: str) -> str:
    for ours, hub in _HUB_NAMES:
        if key.startswith(ours):
            return hub + key.removeprefix(ours)
    return key


def _text_rules(tf: TensorFile, prefix: str):
    def rules(keys: list[str]) -> list[Rule]:
        out = []
        for k in keys:
            name = next((prefix + n for n in (_file_name(k), k) if prefix + n in tf), prefix + _file_name(k))
            if k == _HEAD and name not in tf:  # tied to the input embedding, stored once
                name = prefix + _file_name(_EMBEDDING)
            out.append(Rule(k, name))
        return out

    return rules


def _fill(part: str, module: torch.nn.Module, tf: TensorFile, prefix: str, dtype: torch.dtype | None):
    present = tf.with_prefix(prefix)
    if not present:
        raise CheckpointError(f"{tf.path}: has no {part} ({prefix or part + '/'}* keys)")
    rules = _text_rules(tf, prefix) if part == "text_encoder" else lambda keys: identity_rules(keys, prefix)
    return load_into(module, tf, rules, present=present, what=part, dtype=dtype).eval()


def _text_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text encoder's tensors under the hub's names (a tied head stored once)."""
    state = {_file_name(k): v for k, v in module.state_dict().items()}
    if module.config.tie_word_embeddings:
        state.pop(_HEAD, None)
    return state


def _configs(base: QwenImageBase) -> dict[str, Any]:
    return {
        "transformer": public_config(base.transformer.config),
        "vae": public_config(base.vae.config),
        "text_encoder": base.text_encoder.config.to_dict(),
        "schedule": dict(base.schedule),
        "max_sequence_length": base.max_sequence_length,
    }


def _schedule(stored: dict[str, Any]) -> dict[str, Any]:
    return {**QWEN_SCHEDULE, **{k: stored[k] for k in QWEN_SCHEDULE if k in stored}}


# ------------------------------------------------------------------------------------ folders
def _folder_config(folder: Path, part: str) -> dict[str, Any]:
    path = folder / part / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: the {PIPELINE} folder lacks {part}/config.json")
    cfg = read_json(path)
    return cfg if part == "text_encoder" else {k: v for k, v in cfg.items() if not k.startswith("_")}


def _folder_tokenizer(folder: Path) -> Any:
    where = folder / "tokenizer"
    if not where.is_dir():
        raise CheckpointError(f"{folder}: the {PIPELINE} folder lacks tokenizer/")
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as e:  # transformers' own error types, for missing or damaged files
        raise CheckpointError(
            f"{where}: not a readable tokenizer (expected vocab.json + merges.txt or tokenizer.json; "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_folder(folder: Path, *, dtype: torch.dtype | None = None) -> QwenImageBase:
    from .diffusers import open_weights

    tokenizer = _folder_tokenizer(folder)  # before any weights are read: it is the quick check
    parts = {}
    for part in PARTS:
        module = _build(part, _folder_config(folder, part), str(folder / part / "config.json"))
        stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        parts[part] = _fill(part, module, open_weights(folder / part, stem), "", dtype)
    sched = folder / "scheduler" / "scheduler_config.json"
    schedule = _schedule(read_json(sched) if sched.is_file() else {})
    return QwenImageBase(**parts, tokenizer=tokenizer, schedule=schedule)


# ------------------------------------------------------------------------------------ our file
def _meta_json(tf: TensorFile, key: str) -> Any:
    raw = tf.metadata.get(key)
    if raw is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks {key!r}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tf.path}: metadata entry {key!r} is not JSON ({e})") from None


def _file_tokenizer(tf: TensorFile) -> PreTrainedTokenizerFast:
    text = tf.metadata.get("tokenizer")
    if text is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks 'tokenizer' (Qwen2.5-VL's tokenizer.json)")
    specials = _meta_json(tf, "tokenizer_specials")
    try:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **specials)
    except Exception as e:  # the tokenizers package's own error types
        raise CheckpointError(f"{tf.path}: not a readable tokenizer ({type(e).__name__}: {e})") from None


def load_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> QwenImageBase:
    configs = _meta_json(tf, "base_config")
    if not isinstance(configs, dict) or any(not isinstance(configs.get(p), dict) for p in PARTS):
        raise CheckpointError(
            f"{tf.path}: metadata 'base_config' must hold a config for each of {', '.join(PARTS)}"
        )
    parts = {p: _fill(p, _build(p, configs[p], str(tf.path)), tf, p + ".", dtype) for p in PARTS}
    return QwenImageBase(
        **parts,
        tokenizer=_file_tokenizer(tf),
        max_sequence_length=int(configs.get("max_sequence_length", 512)),
        schedule=_schedule(configs.get("schedule") or {}),
    )


def save(base: QwenImageBase, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Our single file ('controlnet') or a diffusers pipeline folder ('diffusers')."""
    states = {
        "transformer": base.transformer.state_dict(),
        "vae": base.vae.state_dict(),
        "text_encoder": _text_state(base.text_encoder),
    }
    if fmt == "controlnet":
        tok = base.tokenizer
        specials = {s: getattr(tok, s) for s in _SPECIALS if getattr(tok, s, None) is not None}
        meta = {
            META_FORMAT: "base",
            META_VERSION: FORMAT_VERSION,
            "family": FAMILY,
            "base_config": json.dumps(_configs(base), sort_keys=True),
            "tokenizer": tok.backend_tokenizer.to_str(),
            "tokenizer_specials": json.dumps({**specials, "padding_side": tok.padding_side}),
        }
        tensors = {f"{part}.{k}": v for part, state in states.items() for k, v in state.items()}
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            save_safetensors(tensors, tmp, meta)
        return [path]
    if fmt != "diffusers":
        raise ValueError(
            f"a Qwen-Image base model is written as 'controlnet' (ours) or 'diffusers', not {fmt!r}"
        )
    index: dict[str, Any] = {"_class_name": PIPELINE, "_diffusers_version": diffusers.__version__}
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        for part, module in base.modules().items():
            (tmp / part).mkdir()
            if part == "text_encoder":
                cfg = {**module.config.to_dict(), "architectures": [QwenVL.__name__]}
                index[part] = ["transformers", QwenVL.__name__]
                stem = "model"
            else:
                cfg = {"_class_name": type(module).__name__, **public_config(module.config)}
                index[part] = ["diffusers", type(module).__name__]
                stem = "diffusion_pytorch_model"
            (tmp / part / "config.json").write_text(dump_json(cfg))
            save_safetensors(states[part], tmp / part / f"{stem}.safetensors", {"format": "pt"})
        (tmp / "tokenizer").mkdir()
        base.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", **base.schedule}
        (tmp / "scheduler" / "scheduler_config.json").write_text(dump_json(sched))
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        (tmp / "model_index.json").write_text(dump_json(index))
    return [path]
