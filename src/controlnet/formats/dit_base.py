"""Base models of the transformer families (Flux.1, SD3 / SD3.5): diffusers' pipeline folder and
our single file, read offline, key by key. One reader for both, told the family's parts by a
:class:`Spec`.

**diffusers folder** (what ``*Pipeline.save_pretrained`` writes and the hub holds)::

    model_index.json          transformer: FluxTransformer2DModel | SD3Transformer2DModel
    transformer/ vae/         config.json + diffusion_pytorch_model(.safetensors | shards + index)
    text_encoder*/            CLIP (config.json + model.safetensors; SD3: both with projections)
                              and T5 (shards + index); T5 ties its input embedding to
                              ``shared.weight``, which is all a file may hold
    tokenizer*/               CLIP's BPE: the package's own copy is used (the same vocabulary);
                              T5's: ``tokenizer.json`` (read with the ``tokenizers`` package) or
                              ``spiece.model`` (needs ``sentencepiece``)
    scheduler/                the flow-matching shift settings

An SD3 folder may lack its T5 (``text_encoder_3``): the model then reads zeros in its place.

**ours**: one safetensors file, each part under its name (``transformer.``, ``vae.``, ...), with
``family``, every part's config, the schedule and T5's tokenizer (its ``tokenizer.json`` text) in
the metadata, so it loads alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ..families.flux.base import FluxBase
from ..families.flux.schedule import FLUX_SCHEDULE
from ..families.sd.configs import Family
from ..families.sd3.base import SD3_SCHEDULE, SD3Base
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
    metadata_json,
    pipeline_part,
    read_json,
    save_safetensors,
)
from .keymap import Rule, load_into
from .ours import settings_metadata

__all__ = [
    "SPECS",
    "Spec",
    "build_part",
    "fill_part",
    "load_file",
    "load_folder",
    "pipeline_spec",
    "save",
    "spec_of_file",
    "t5_tokenizer",
    "tokenizer_from_json",
    "write_index",
]

TIED = ("encoder.embed_tokens.weight", "shared.weight")  # T5's input embedding and what it ties to
TOKENIZER_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class Spec:
    """What a transformer family's base model is made of, for its readers and writers."""

    family: str
    label: str
    pipeline: str  # diffusers' pipeline class name, in model_index.json
    transformer: type
    parts: tuple[str, ...]  # transformer, vae, then the text encoders in order
    clips: tuple[str, ...]  # the CLIP encoders among the parts (the rest of the text ones: T5)
    t5: str  # the T5 encoder's part (and its tokenizer's folder is tokenizer{suffix})
    optional: tuple[str, ...]  # parts a model may lack
    schedule: dict[str, Any]
    max_sequence_length: int
    # (parts, T5 tokenizer or None, max_sequence_length, schedule) -> the base model
    make: Callable[[dict[str, Any], Any, int, dict[str, Any]], Any]

    @property
    def t5_tokenizer_folder(self) -> str:
        return "tokenizer" + self.t5.removeprefix("text_encoder")


def _flux(parts: dict[str, Any], t5_tok: Any, length: int, schedule: dict[str, Any]) -> FluxBase:
    return FluxBase(
        parts["transformer"],
        parts["vae"],
        parts["text_encoder"],
        parts["text_encoder_2"],
        clip_tokenizer(Family.SD1),
        t5_tok,
        max_sequence_length=length,
        schedule=schedule,
    )


def _sd3(parts: dict[str, Any], t5_tok: Any, length: int, schedule: dict[str, Any]) -> SD3Base:
    return SD3Base(
        parts["transformer"],
        parts["vae"],
        parts["text_encoder"],
        parts["text_encoder_2"],
        parts.get("text_encoder_3"),
        clip_tokenizer(Family.SD1),
        clip_tokenizer(Family.SDXL, second=True),
        t5_tok,
        max_sequence_length=length,
        schedule=schedule,
    )


SPECS = {
    "flux": Spec(
        "flux",
        "Flux.1",
        "FluxPipeline",
        FluxTransformer2DModel,
        ("transformer", "vae", "text_encoder", "text_encoder_2"),
        ("text_encoder",),
        "text_encoder_2",
        (),
        FLUX_SCHEDULE,
        512,
        _flux,
    ),
    "sd3": Spec(
        "sd3",
        "SD3",
        "StableDiffusion3Pipeline",
        SD3Transformer2DModel,
        ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
        ("text_encoder", "text_encoder_2"),
        "text_encoder_3",
        ("text_encoder_3",),
        SD3_SCHEDULE,
        256,
        _sd3,
    ),
}
_BY_TRANSFORMER = {spec.transformer.__name__: spec for spec in SPECS.values()}
_BY_CLASS = {FluxBase: SPECS["flux"], SD3Base: SPECS["sd3"]}


def pipeline_spec(folder: Path) -> Spec | None:
    """The family of a diffusers pipeline folder of a transformer family, or None."""
    return _BY_TRANSFORMER.get(pipeline_part(folder, "transformer") or "")


def spec_of_file(tf: TensorFile) -> Spec | None:
    """The family of a base model in our single file, or None."""
    if tf.metadata.get(META_FORMAT) != "base":
        return None
    return SPECS.get(tf.metadata.get("family", ""))


# ------------------------------------------------------------------------------------ building
def build_part(
    spec: Spec, part: str, config: dict[str, Any], where: str, device: str = "meta"
) -> torch.nn.Module:
    """The module of ``part`` from its config: on the meta device for a loader to fill, or on
    ``device`` with each class's own fresh initialisation."""
    try:
        if part == "transformer":
            with torch.device(device):
                return spec.transformer.from_config(config)
        if part == "vae":
            with torch.device(device):
                return AutoencoderKL.from_config(config)
        if part in spec.clips:
            return build_text_encoder(config, device)
        with torch.device(device):
            return T5EncoderModel(T5Config(**config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a usable {part} config ({e})") from None


def _rules(spec: Spec, part: str, module: torch.nn.Module, tf: TensorFile, prefix: str = ""):
    canonical = text_file_prefix(module, tf.keys(), prefix) if part in spec.clips else ""

    def rules(keys: list[str]) -> list[Rule]:
        out = []
        for k in keys:
            name = prefix + canonical + k
            if part == spec.t5 and k == TIED[0] and name not in tf:
                name = prefix + TIED[1]  # the tied embedding, stored once
            out.append(Rule(k, name))
        return out

    return rules


def fill_part(
    spec: Spec, part: str, module: torch.nn.Module, tf: TensorFile, prefix: str, dtype: torch.dtype | None
) -> torch.nn.Module:
    present = [k for k in tf.with_prefix(prefix) if not k.endswith("embeddings.position_ids")]
    if not present:
        raise CheckpointError(f"{tf.path}: has no {part} ({prefix or part + '/'}* keys)")
    rules = _rules(spec, part, module, tf, prefix)
    return load_into(module, tf, rules, present=present, what=part, dtype=dtype)


def tokenizer_from_json(
    text: str, where: str, specials: dict[str, Any] = TOKENIZER_SPECIALS
) -> PreTrainedTokenizerFast:
    """A tokenizer from its ``tokenizer.json`` text, with ``specials`` (its special tokens and
    settings; T5's by default); CheckpointError naming ``where`` if it cannot be read."""
    try:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **specials)
    except Exception as e:  # the tokenizers package's own error types
        raise CheckpointError(f"{where}: not a readable tokenizer ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------ folders
def t5_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tj = folder / "tokenizer.json"
    if tj.is_file():
        return tokenizer_from_json(tj.read_text(), str(tj))
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


def _folder_config(spec: Spec, folder: Path, part: str) -> dict[str, Any]:
    if not (folder / part / "config.json").is_file():
        raise CheckpointError(f"{folder}: the {spec.pipeline} folder lacks {part}/config.json")
    if part in spec.clips:
        from .diffusers import _text_config

        return _text_config(folder / part)
    cfg = read_json(folder / part / "config.json")
    return cfg if part == spec.t5 else {k: v for k, v in cfg.items() if not k.startswith("_")}


def _schedule(spec: Spec, stored: dict[str, Any]) -> dict[str, Any]:
    return {**spec.schedule, **{k: stored[k] for k in spec.schedule if k in stored}}


def load_folder(folder: Path, *, dtype: torch.dtype | None = None) -> Any:
    from .diffusers import open_weights

    spec = pipeline_spec(folder)
    assert spec is not None
    parts = {}
    for part in spec.parts:
        if part in spec.optional and not (folder / part).is_dir():
            continue
        module = build_part(
            spec, part, _folder_config(spec, folder, part), str(folder / part / "config.json")
        )
        stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
        parts[part] = fill_part(spec, part, module, open_weights(folder / part, stem), "", dtype)
    sched = folder / "scheduler" / "scheduler_config.json"
    schedule = _schedule(spec, read_json(sched) if sched.is_file() else {})
    t5_tok = t5_tokenizer(folder / spec.t5_tokenizer_folder) if spec.t5 in parts else None
    return spec.make(parts, t5_tok, spec.max_sequence_length, schedule)


# ------------------------------------------------------------------------------------ our file
def load_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> Any:
    spec = spec_of_file(tf)
    assert spec is not None
    configs = metadata_json(tf, "base_config")
    required = [p for p in spec.parts if p not in spec.optional]
    if not isinstance(configs, dict) or any(not isinstance(configs.get(p), dict) for p in required):
        raise CheckpointError(
            f"{tf.path}: metadata 'base_config' must hold a config for each of {', '.join(required)}"
        )
    parts = {
        p: fill_part(spec, p, build_part(spec, p, configs[p], str(tf.path)), tf, p + ".", dtype)
        for p in spec.parts
        if isinstance(configs.get(p), dict)
    }
    t5_tok = None
    if spec.t5 in parts:
        tokenizer = tf.metadata.get("t5_tokenizer")
        if tokenizer is None:
            raise CheckpointError(f"{tf.path}: the metadata lacks 't5_tokenizer' (T5's tokenizer)")
        t5_tok = tokenizer_from_json(tokenizer, str(tf.path))
    length = int(configs.get("max_sequence_length", spec.max_sequence_length))
    return spec.make(parts, t5_tok, length, _schedule(spec, configs.get("schedule") or {}))


def _t5_tokenizer_of(spec: Spec, base: Any) -> Any:
    return getattr(base, "tokenizer" + spec.t5.removeprefix("text_encoder"))


def _configs(spec: Spec, base: Any) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for part, module in base.modules().items():
        if part in spec.clips:
            configs[part] = text_config_of(module)
        elif part == spec.t5:
            configs[part] = module.config.to_dict()
        else:
            configs[part] = public_config(module.config)
    return {**configs, "schedule": dict(base.schedule), "max_sequence_length": base.max_sequence_length}


def _state(spec: Spec, part: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.state_dict())
    if part in spec.clips:
        canonical = text_key_prefix(module)
        return {canonical + k: v for k, v in state.items()}
    if part == spec.t5:
        state.pop(TIED[0], None)  # tied to shared.weight: stored once
    return state


def write_index(folder: Path, index: dict[str, Any], schedule: dict[str, Any]) -> None:
    """A transformer family's pipeline folder's flow-matching ``scheduler/`` and its
    ``model_index.json`` (``index``: the parts written so far)."""
    (folder / "scheduler").mkdir()
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", **schedule}
    (folder / "scheduler" / "scheduler_config.json").write_text(dump_json(sched))
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(dump_json(index))


def save(base: Any, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Our single file ('controlnet') or a diffusers pipeline folder ('diffusers')."""
    spec = _BY_CLASS[type(base)]
    t5 = spec.t5 in base.modules()
    tokenizer = _t5_tokenizer_of(spec, base).backend_tokenizer.to_str() if t5 else None
    if fmt == "controlnet":
        tensors = {}
        for part, module in base.modules().items():
            tensors.update({f"{part}.{k}": v for k, v in _state(spec, part, module).items()})
        meta = {
            META_FORMAT: "base",
            META_VERSION: FORMAT_VERSION,
            **settings_metadata(base),
            "family": spec.family,
            "base_config": json.dumps(_configs(spec, base), sort_keys=True),
        }
        if tokenizer is not None:
            meta["t5_tokenizer"] = tokenizer
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            save_safetensors(tensors, tmp, meta)
        return [path]
    if fmt != "diffusers":
        raise ValueError(
            f"a {spec.family} base model is written as 'controlnet' (ours) or 'diffusers', not {fmt!r}"
        )
    index: dict[str, Any] = {"_class_name": spec.pipeline, "_diffusers_version": diffusers.__version__}
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        for part, module in base.modules().items():
            (tmp / part).mkdir()
            if part in spec.clips:
                cfg = {**module.config.to_dict(), **text_config_of(module)}
                index[part] = ["transformers", type(module).__name__]
            elif part == spec.t5:
                cfg = {**module.config.to_dict(), "architectures": ["T5EncoderModel"]}
                index[part] = ["transformers", "T5EncoderModel"]
            else:
                cfg = {"_class_name": type(module).__name__, **public_config(module.config)}
                index[part] = ["diffusers", type(module).__name__]
            stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
            (tmp / part / "config.json").write_text(dump_json(cfg))
            save_safetensors(_state(spec, part, module), tmp / part / f"{stem}.safetensors", {"format": "pt"})
        for clip in spec.clips:
            sub = "tokenizer" + clip.removeprefix("text_encoder")
            (tmp / sub).mkdir()
            getattr(base, sub).save_pretrained(str(tmp / sub))
            index[sub] = ["transformers", "CLIPTokenizer"]
        if tokenizer is not None:
            sub = spec.t5_tokenizer_folder
            (tmp / sub).mkdir()
            (tmp / sub / "tokenizer.json").write_text(tokenizer)
            (tmp / sub / "special_tokens_map.json").write_text(dump_json(TOKENIZER_SPECIALS))
            index[sub] = ["transformers", "T5TokenizerFast"]
        write_index(tmp, index, base.schedule)
    return [path]
