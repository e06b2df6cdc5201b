"""Base models of the transformer families whose text encoder is one language model (Qwen-Image:
Qwen2.5-VL; Z-Image: Qwen3): diffusers' pipeline folder and our single file, read offline, key by
key. One reader and writer for both, told the family's parts by an :class:`LMSpec`.

**diffusers folder** (what ``QwenImagePipeline`` / ``ZImagePipeline.save_pretrained`` write and
the hub holds)::

    model_index.json   transformer: QwenImageTransformer2DModel | ZImageTransformer2DModel
    transformer/ vae/  config.json + diffusion_pytorch_model(.safetensors | shards + index)
    text_encoder/      config.json (its ``architectures`` names the class) + model(.safetensors |
                       shards + index); Qwen2.5-VL under the hub's names (model.layers.*, visual.*,
                       lm_head.*) or transformers' own (model.language_model.*, model.visual.*);
                       a head tied to the input embedding may be left out
    tokenizer/         Qwen's byte-level BPE (vocab.json + merges.txt and/or tokenizer.json, the
                       chat template in tokenizer_config.json), read by transformers
    scheduler/         the flow-matching shift settings

**ours**: one safetensors file, each part under its name (``transformer.``, ``vae.``,
``text_encoder.``, the text encoder under the file names above), with ``family``, every part's
config, the schedule and the tokenizer (its ``tokenizer.json`` text, special tokens and chat
template) in the metadata, so it loads alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    QwenImageTransformer2DModel,
    ZImageTransformer2DModel,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3ForCausalLM, Qwen3Model
from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

from ..families.qwenimage.base import QWEN_SCHEDULE, QwenImageBase
from ..families.zimage.base import ZIMAGE_SCHEDULE, ZImageBase
from .build import FORMAT_VERSION, META_FORMAT, META_VERSION, public_config
from .checkpoint import (
    CheckpointError,
    TensorFile,
    atomic_outputs,
    dump_json,
    metadata_json,
    pipeline_part,
    read_json,
    save_safetensors,
)
from .dit_base import tokenizer_from_json, write_index
from .keymap import Rule, identity_rules, load_into, weights_on_meta
from .ours import settings_metadata

__all__ = ["SPECS", "LMSpec", "load_file", "load_folder", "save", "spec_of_file", "spec_of_folder"]

PARTS = ("transformer", "vae", "text_encoder")
_HEAD = "lm_head.weight"
_SPECIALS = ("pad_token", "eos_token", "bos_token", "unk_token")


@dataclass(frozen=True)
class LMSpec:
    """What such a family's base model is made of, for its readers and writers."""

    family: str
    label: str
    pipeline: str  # diffusers' pipeline class name, in model_index.json
    transformer: type
    vae: type
    base: type
    texts: tuple[type, ...]  # the text encoder classes it takes (by config.json's architectures)
    file_names: tuple[tuple[str, str], ...]  # the text encoder's module prefixes -> its files' prefixes
    schedule: dict[str, Any]

    def text_class(self, config: dict[str, Any], where: str) -> type:
        names = {c.__name__: c for c in self.texts}
        arch = (config.get("architectures") or [self.texts[0].__name__])[0]
        if arch not in names:
            raise CheckpointError(
                f"{where}: text encoder class {arch!r} is not {self.label}'s ({', '.join(names)})"
            )
        return names[arch]

    def file_name(self, key: str) -> str:
        for ours, theirs in self.file_names:
            if key.startswith(ours):
                return theirs + key.removeprefix(ours)
        return key


SPECS = {
    "qwenimage": LMSpec(
        "qwenimage",
        "Qwen-Image",
        "QwenImagePipeline",
        QwenImageTransformer2DModel,
        AutoencoderKLQwenImage,
        QwenImageBase,
        (QwenVL,),
        (("model.language_model.", "model."), ("model.visual.", "visual.")),
        QWEN_SCHEDULE,
    ),
    "zimage": LMSpec(
        "zimage",
        "Z-Image",
        "ZImagePipeline",
        ZImageTransformer2DModel,
        AutoencoderKL,
        ZImageBase,
        (Qwen3Model, Qwen3ForCausalLM),
        (),
        ZIMAGE_SCHEDULE,
    ),
}
_BY_TRANSFORMER = {spec.transformer.__name__: spec for spec in SPECS.values()}
_BY_BASE = {spec.base: spec for spec in SPECS.values()}


def spec_of_folder(folder: Path) -> LMSpec | None:
    """The family of a diffusers pipeline folder of one of these families, or None."""
    return _BY_TRANSFORMER.get(pipeline_part(folder, "transformer") or "")


def spec_of_file(tf: TensorFile) -> LMSpec | None:
    """The family of a base model of these families in our single file, or None."""
    if tf.metadata.get(META_FORMAT) != "base":
        return None
    return SPECS.get(tf.metadata.get("family", ""))


# ------------------------------------------------------------------------------------ parts
def _build(spec: LMSpec, part: str, config: dict[str, Any], where: str) -> torch.nn.Module:
    """``part``'s module with its parameters on the meta device for :func:`_fill`."""
    try:
        with weights_on_meta():
            if part == "transformer":
                return spec.transformer.from_config(config)
            if part == "vae":
                return spec.vae.from_config(config)
            cls = spec.text_class(config, where)
            return cls(cls.config_class.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: not a usable {part} config ({e})") from None


def _embedding_name(module: torch.nn.Module) -> str:
    weight = module.get_input_embeddings().weight
    return next(n for n, p in module.named_parameters(remove_duplicate=False) if p is weight and n != _HEAD)


def _text_rules(spec: LMSpec, module: torch.nn.Module, tf: TensorFile, prefix: str):
    def rules(keys: list[str]) -> list[Rule]:
        out = []
        for k in keys:
            name = next(
                (prefix + n for n in (spec.file_name(k), k) if prefix + n in tf), prefix + spec.file_name(k)
            )
            if k == _HEAD and name not in tf:  # tied to the input embedding, stored once
                name = prefix + spec.file_name(_embedding_name(module))
            out.append(Rule(k, name))
        return out

    return rules


def _fill(spec: LMSpec, part: str, module: torch.nn.Module, tf: TensorFile, prefix: str, dtype: Any):
    present = tf.with_prefix(prefix)
    if not present:
        raise CheckpointError(f"{tf.path}: has no {part} ({prefix or part + '/'}* keys)")
    if part == "text_encoder":
        rules = _text_rules(spec, module, tf, prefix)
    else:
        rules = lambda keys: identity_rules(keys, prefix)  # noqa: E731
    return load_into(module, tf, rules, present=present, what=part, dtype=dtype).eval()


def _text_state(spec: LMSpec, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text encoder's tensors under its files' names (a tied head stored once)."""
    state = {spec.file_name(k): v for k, v in module.state_dict().items()}
    if getattr(module.config, "tie_word_embeddings", False):
        state.pop(_HEAD, None)
    return state


def _text_config(module: torch.nn.Module) -> dict[str, Any]:
    return {**module.config.to_dict(), "architectures": [type(module).__name__]}


def _configs(base: Any) -> dict[str, Any]:
    return {
        "transformer": public_config(base.transformer.config),
        "vae": public_config(base.vae.config),
        "text_encoder": _text_config(base.text_encoder),
        "schedule": dict(base.schedule),
        "max_sequence_length": base.max_sequence_length,
    }


def _schedule(spec: LMSpec, stored: dict[str, Any]) -> dict[str, Any]:
    return {**spec.schedule, **{k: stored[k] for k in spec.schedule if k in stored}}


# ------------------------------------------------------------------------------------ folders
def _folder_config(spec: LMSpec, folder: Path, part: str) -> dict[str, Any]:
    path = folder / part / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: the {spec.pipeline} folder lacks {part}/config.json")
    cfg = read_json(path)
    return cfg if part == "text_encoder" else {k: v for k, v in cfg.items() if not k.startswith("_")}


def _folder_tokenizer(spec: LMSpec, folder: Path) -> Any:
    where = folder / "tokenizer"
    if not where.is_dir():
        raise CheckpointError(f"{folder}: the {spec.pipeline} folder lacks tokenizer/")
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as e:  # transformers' own error types, for missing or damaged files
        raise CheckpointError(
            f"{where}: not a readable tokenizer (expected vocab.json + merges.txt or tokenizer.json; "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_folder(folder: Path, *, dtype: torch.dtype | None = None) -> Any:
    from .diffusers import open_weights

    spec = spec_of_folder(folder)
    assert spec is not None
    tokenizer = _folder_tokenizer(spec, folder)  # before any weights are read: it is the quick check
    parts = {}
    for part in PARTS:
        module = _build(spec, part, _folder_config(spec, folder, part), str(folder / part / "config.json"))
        stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        parts[part] = _fill(spec, part, module, open_weights(folder / part, stem), "", dtype)
    sched = folder / "scheduler" / "scheduler_config.json"
    schedule = _schedule(spec, read_json(sched) if sched.is_file() else {})
    return spec.base(**parts, tokenizer=tokenizer, schedule=schedule)


# ------------------------------------------------------------------------------------ our file
def _file_tokenizer(tf: TensorFile) -> PreTrainedTokenizerFast:
    text = tf.metadata.get("tokenizer")
    if text is None:
        raise CheckpointError(
            f"{tf.path}: the metadata lacks 'tokenizer' (the text encoder's tokenizer.json)"
        )
    return tokenizer_from_json(text, str(tf.path), metadata_json(tf, "tokenizer_specials"))


def load_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> Any:
    spec = spec_of_file(tf)
    assert spec is not None
    configs = metadata_json(tf, "base_config")
    if not isinstance(configs, dict) or any(not isinstance(configs.get(p), dict) for p in PARTS):
        raise CheckpointError(
            f"{tf.path}: metadata 'base_config' must hold a config for each of {', '.join(PARTS)}"
        )
    parts = {p: _fill(spec, p, _build(spec, p, configs[p], str(tf.path)), tf, p + ".", dtype) for p in PARTS}
    return spec.base(
        **parts,
        tokenizer=_file_tokenizer(tf),
        max_sequence_length=int(configs.get("max_sequence_length", 512)),
        schedule=_schedule(spec, configs.get("schedule") or {}),
    )


def save(base: Any, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Our single file ('controlnet') or a diffusers pipeline folder ('diffusers')."""
    spec = _BY_BASE[type(base)]
    states = {
        "transformer": base.transformer.state_dict(),
        "vae": base.vae.state_dict(),
        "text_encoder": _text_state(spec, base.text_encoder),
    }
    if fmt == "controlnet":
        tok = base.tokenizer
        specials = {s: getattr(tok, s) for s in _SPECIALS if getattr(tok, s, None) is not None}
        if getattr(tok, "chat_template", None):
            specials["chat_template"] = tok.chat_template
        meta = {
            META_FORMAT: "base",
            META_VERSION: FORMAT_VERSION,
            **settings_metadata(base),
            "family": spec.family,
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
            f"a {spec.label} base model is written as 'controlnet' (ours) or 'diffusers', not {fmt!r}"
        )
    index: dict[str, Any] = {"_class_name": spec.pipeline, "_diffusers_version": diffusers.__version__}
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        for part, module in base.modules().items():
            (tmp / part).mkdir()
            if part == "text_encoder":
                cfg = _text_config(module)
                index[part] = ["transformers", type(module).__name__]
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
        write_index(tmp, index, base.schedule)
    return [path]
