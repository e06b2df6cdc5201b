"""Architectures: the configs a loader needs, where they come from, and modules built from them.

A base model's architecture is a :class:`BaseConfig` (UNet, VAE, text encoder(s), schedule). It
comes, in this order, from our own metadata in the file, from the caller, or from the family
configs that ship in :mod:`controlnet.families.sd.configs`, the family being read off tensor shapes. Modules
are built on the meta device (no memory, no random init) and filled by
:func:`~controlnet.formats.keymap.load_into`.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..families.sd.base import DEFAULT_SCHEDULE, UNetBase
from ..families.sd.compat import UNET_FIELDS
from ..families.sd.configs import Family, family_of_unet_config, text_encoder_config, unet_config, vae_config
from ..families.sd.controlnet import ControlNet, ControlNetConfig
from ..families.sd.union import UnionConfig, UnionControlNet
from ..text.tokenizer import clip_tokenizer
from .checkpoint import CheckpointError, TensorFile

__all__ = [
    "TEXT_FIELDS",
    "UNET_FIELDS",
    "BaseConfig",
    "build_text_encoder",
    "build_unet",
    "build_union",
    "build_vae",
    "family_from_context",
    "hint_config_from_shapes",
    "make_base",
    "text_key_prefix",
]

#: CLIPTextConfig fields that shape the network (the rest are training or generation settings).
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_CONTEXT_DIMS = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its private ``_`` entries, lists for tuples (JSON-stable)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def text_config_of(model: CLIPTextModel | CLIPTextModelWithProjection) -> dict[str, Any]:
    cfg = {f: getattr(model.config, f) for f in TEXT_FIELDS}
    cfg["architectures"] = [type(model).__name__]
    return cfg


@dataclass
class BaseConfig:
    """Everything needed to build a base model's modules: diffusers / transformers keyword
    arguments of each part (a text config's ``architectures`` names its class) and the schedule."""

    family: Family
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    schedule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))

    @classmethod
    def for_family(cls, family: Family) -> BaseConfig:
        """The released full-size architecture of ``family``."""
        te = {**text_encoder_config(family), "architectures": ["CLIPTextModel"]}
        te2 = None
        if family is Family.SDXL:
            te2 = {
                **text_encoder_config(family, second=True),
                "architectures": ["CLIPTextModelWithProjection"],
            }
        return cls(family, unet_config(family), vae_config(family), te, te2)

    @classmethod
    def of(cls, base: UNetBase) -> BaseConfig:
        te2 = None if base.text_encoder_2 is None else text_config_of(base.text_encoder_2)
        return cls(
            base.family,
            public_config(base.unet.config),
            public_config(base.vae.config),
            text_config_of(base.text_encoder),
            te2,
            dict(base.schedule),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family.value,
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "schedule": self.schedule,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseConfig:
        try:
            return cls(
                Family(d["family"]),
                dict(d["unet"]),
                dict(d["vae"]),
                dict(d["text_encoder"]),
                None if d.get("text_encoder_2") is None else dict(d["text_encoder_2"]),
                dict(d.get("schedule") or DEFAULT_SCHEDULE),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a base model config ({type(e).__name__}: {e})") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ------------------------------------------------------------------------------------ builders
def _known_kwargs(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without private or unknown entries: configs written by other diffusers versions
    carry fields this one does not take (the way diffusers itself reads them)."""
    known = set(inspect.signature(cls.__init__).parameters)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in known}


def build_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**_known_kwargs(UNet2DConditionModel, config))


def build_controlnet(unet_config: Mapping[str, Any], config: ControlNetConfig) -> ControlNet:
    return ControlNet.from_config(_known_kwargs(UNet2DConditionModel, unet_config), config, device="meta")


def build_union(
    unet_config: Mapping[str, Any], config: ControlNetConfig, union: UnionConfig
) -> UnionControlNet:
    """An SDXL Union ControlNet's architecture on the meta device (weights to assign)."""
    with torch.device("meta"):
        template = UNet2DConditionModel(**_known_kwargs(UNet2DConditionModel, unet_config))
        return UnionControlNet(template, config, union)


def build_vae(config: Mapping[str, Any]) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**_known_kwargs(AutoencoderKL, config))


def build_text_encoder(
    config: Mapping[str, Any], device: str = "meta"
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text encoder of ``config`` (its ``architectures`` names the class): on the meta device
    for a loader to fill, or on ``device`` freshly initialised."""
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    if arch not in classes:
        raise ValueError(f"text encoder class {arch!r} is not supported (expected one of {sorted(classes)})")
    kwargs = {k: v for k, v in config.items() if k in TEXT_FIELDS}
    with torch.device(device):
        model = classes[arch](CLIPTextConfig(**kwargs))
    # position_ids is not saved with the weights: give it its values now (the rest comes from the file)
    emb = getattr(model, "text_model", model).embeddings
    emb.register_buffer(
        "position_ids", torch.arange(kwargs["max_position_embeddings"]).expand((1, -1)), persistent=False
    )
    return model


def text_key_prefix(model: torch.nn.Module) -> str:
    """What to put before ``model``'s state-dict keys to get the names every CLIP weight file uses
    (``text_model.embeddings...``): transformers 5 flattened ``CLIPTextModel``, 4.x did not."""
    return "" if hasattr(model, "text_model") else "text_model."


def text_file_prefix(model: torch.nn.Module, file_keys: Iterable[str], prefix: str = "") -> str:
    """What to put before ``model``'s keys to find them in a file whose keys under ``prefix`` are
    ``file_keys``: the usual ``text_model.`` names, or the flattened names transformers 5.x saves
    (``embeddings...``), whichever the file has."""
    canonical = text_key_prefix(model)
    if canonical and not any(k.startswith(prefix + canonical) for k in file_keys):
        return ""
    return canonical


#: Fills one part ('unet', 'vae', 'text_encoder', 'text_encoder_2') built on the meta device.
Loader = Callable[[str, torch.nn.Module], torch.nn.Module]


def make_base(config: BaseConfig, load: Loader) -> UNetBase:
    """Build every part of ``config`` on the meta device, fill each with ``load(part, module)``
    and bundle them with the family's offline tokenizers."""
    te2 = None
    if config.text_encoder_2 is not None:
        te2 = load("text_encoder_2", build_text_encoder(config.text_encoder_2))
    return UNetBase(
        config.family,
        load("unet", build_unet(config.unet)),
        load("vae", build_vae(config.vae)),
        load("text_encoder", build_text_encoder(config.text_encoder)),
        clip_tokenizer(config.family),
        schedule=dict(config.schedule),
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(config.family, second=True) if te2 is not None else None,
    )


def fresh_base(config: BaseConfig, seed: int = 0) -> UNetBase:
    """A base model of ``config``'s architecture with freshly initialised weights (the start of
    training one from scratch, as the bundled model was)."""
    torch.manual_seed(seed)
    te_cfg = {k: v for k, v in config.text_encoder.items() if k in TEXT_FIELDS}
    arch = (config.text_encoder.get("architectures") or ["CLIPTextModel"])[0]
    if arch != "CLIPTextModel" or config.text_encoder_2 is not None:
        raise ValueError("a fresh base model needs one CLIPTextModel text encoder (SD1.x/SD2.x style)")
    return UNetBase(
        config.family,
        UNet2DConditionModel(**_known_kwargs(UNet2DConditionModel, config.unet)),
        AutoencoderKL(**_known_kwargs(AutoencoderKL, config.vae)),
        CLIPTextModel(CLIPTextConfig(**te_cfg)),
        clip_tokenizer(config.family),
        schedule=dict(config.schedule),
    )


# ------------------------------------------------------------------------------------ inference
def family_from_context(shapes: Mapping[str, tuple[int, ...]], prefix: str, where: str) -> Family:
    """The family of a UNet or ControlNet under ``prefix`` from its cross-attention width
    (768 SD1.x, 1024 SD2.x, 2048 SDXL, which also has the added embedding)."""
    widths = {s[1] for k, s in shapes.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")}
    added = any(k.startswith((prefix + "label_emb.", prefix + "add_embedding.")) for k in shapes)
    if len(widths) != 1:
        raise CheckpointError(f"{where}: cannot tell the model family: no single cross-attention width")
    width = widths.pop()
    family = _CONTEXT_DIMS.get(width)
    if family is None or (family is Family.SDXL) != added:
        raise CheckpointError(
            f"{where}: unknown architecture (cross-attention width {width}, "
            f"{'with' if added else 'without'} an added embedding); SD1.x has 768, SD2.x 1024, SDXL 2048 "
            "with an added embedding. Pass its configs explicitly for other architectures."
        )
    return family


def hint_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], conv_names: list[str], global_pool: bool = False
) -> ControlNetConfig:
    """ControlNetConfig from the hint encoder's conv weights, given in order (first, the pairs
    between, last): each stage's width is the output of its first conv and of each strided conv."""
    for name in conv_names:
        shape = shapes[name + ".weight"]
        if len(shape) != 4 or 0 in shape:
            raise CheckpointError(
                f"hint encoder: {name}.weight has shape {tuple(shape)}, expected a kernel (out, in, k, k)"
            )
    first = shapes[conv_names[0] + ".weight"]
    between = [shapes[n + ".weight"] for n in conv_names[1:-1]]
    if len(between) % 2:
        raise CheckpointError(f"hint encoder: {len(conv_names)} convs cannot be stages of two")
    widths = [first[0], *(s[0] for s in between[1::2])]
    return ControlNetConfig(
        hint_channels=first[1], hint_block_channels=tuple(widths), global_pool=global_pool
    )


def numbered(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern``'s group 1 among the keys (the pattern
    matches whole keys: end it with ``.*`` to match their beginnings)."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := rx.fullmatch(k))})


def shape_of(shapes: Mapping[str, tuple[int, ...]], key: str, where: str) -> tuple[int, ...]:
    """The shape of ``key``; a file without it cannot be read as the model asked for
    (CheckpointError naming ``where`` and the key)."""
    if key not in shapes:
        raise CheckpointError(f"{where}: expected {key!r} (cannot read the architecture without it)")
    return tuple(shapes[key])


# ------------------------------------------------------------------------------------ metadata
#: Every safetensors file we write carries its architecture in the header's metadata, so it loads
#: as what it was, whatever its size; our own format is marked by META_FORMAT as well.
META_FORMAT = "controlnet_format"  # "controlnet" or "base"
META_VERSION = "controlnet_format_version"
FORMAT_VERSION = "1"


def controlnet_metadata(unet_config: Mapping[str, Any], config: ControlNetConfig) -> dict[str, str]:
    return {
        "family": family_of_unet_config(dict(unet_config)).value,
        "unet_config": json.dumps(public_config(unet_config), sort_keys=True),
        "controlnet_config": json.dumps(config.to_dict(), sort_keys=True),
    }


def base_metadata(base: UNetBase) -> dict[str, str]:
    return {"family": base.family.value, "base_config": BaseConfig.of(base).to_json()}


def _stored(tf: TensorFile, key: str) -> Any:
    raw = tf.metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tf.path}: metadata entry {key!r} is not valid JSON ({e})") from e


def stored_controlnet_arch(tf: TensorFile) -> tuple[dict[str, Any], ControlNetConfig] | None:
    """The (UNet config, ControlNetConfig) a file we wrote carries, or None."""
    unet, cn = _stored(tf, "unet_config"), _stored(tf, "controlnet_config")
    if unet is None or cn is None:
        return None
    try:
        return dict(unet), ControlNetConfig.from_dict(cn)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{tf.path}: stored ControlNet config is invalid ({e})") from e


def stored_base_config(tf: TensorFile) -> BaseConfig | None:
    d = _stored(tf, "base_config")
    if d is None:
        return None
    try:
        return BaseConfig.from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"{tf.path}: stored base model config is invalid ({e})") from e
