"""LoRA files merged into a base model's weights (the A1111 web UI's ``<lora:name:weight>``,
diffusers' ``load_lora_weights`` + ``fuse_lora``).

A LoRA stores, for some linear and convolution layers of the UNet and the text encoder(s), two
low-rank factors: ``W' = W + scale * (alpha / rank) * up @ down``. Layouts, told apart by their
key names:
- kohya / A1111: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, the
  module path with its dots as underscores, in diffusers' names
  (``lora_unet_down_blocks_0_attentions_0_proj_in``) or the original ones
  (``lora_unet_input_blocks_1_1_proj_in``, as SDXL LoRAs name them); text encoders as
  ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``) + ``text_model_encoder_layers_0_...``;
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (or ``.lora.down.weight``
  / ``.lora.up.weight``), ``text_encoder.`` and ``text_encoder_2.`` for the text encoders; without
  an ``alpha`` the factors are used as they are (alpha = rank).

Every layer is checked (its module exists, its factors fit it) before any weight changes: a file
for another model, or of another kind (LyCORIS LoHa / LoKr, DoRA), is refused whole, with the
names of what did not fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..families.sd.base import UNetBase
from .build import text_key_prefix
from .checkpoint import CheckpointError, TensorFile, list_keys, open_tensors
from .keymap import finite
from .ldm import unet_rule

__all__ = [
    "LoraLayer",
    "fits_weight",
    "is_lora_key",
    "is_pointwise",
    "is_product",
    "layer_names",
    "merge_loras",
    "read_lora",
]

#: key endings of the two factors, (down, up), by layout
_FACTORS = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)
#: key parts of other adapter kinds, and what they are
_OTHER_KINDS = {
    "hada_w": "LyCORIS LoHa",
    "lokr_w": "LyCORIS LoKr",
    "dora_scale": "DoRA",
    "lora_mid": "LyCORIS LoCon with a middle factor",
}


@dataclass(frozen=True)
class LoraLayer:
    """One layer of a LoRA file: its name there, the factors and ``alpha`` (None: the rank)."""

    name: str
    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """``(alpha / rank) * up @ down`` in float32, shaped as the weight it is added to (a k x k
        convolution's down factor flattens in the order its weight does)."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        if self.alpha is not None:
            d = d * (self.alpha / self.rank)
        return d.reshape(shape)


def is_lora_key(key: str) -> bool:
    """Whether ``key`` names a LoRA factor, in any layout read here."""
    return key.endswith(tuple(end for pair in _FACTORS for end in pair))


def read_lora(path: str | Path) -> list[LoraLayer]:
    """The layers of the LoRA file at ``path``, every key accounted for."""
    tf = open_tensors(path)
    for key in tf:
        for part, kind in _OTHER_KINDS.items():
            if part in key:
                raise CheckpointError(
                    f"{tf.path}: {key!r} belongs to a {kind} adapter; only LoRA files "
                    "(lora_down/lora_up, lora_A/lora_B) can be merged"
                )
    layers, used = [], set()
    for key in tf:
        for down_end, up_end in _FACTORS:
            if not key.endswith(down_end):
                continue
            name = key[: -len(down_end)]
            up_key = name + up_end
            if up_key not in tf:
                raise CheckpointError(f"{tf.path}: {key!r} has no {up_key!r} beside it")
            alpha_key = name + ".alpha"
            alpha = float(tf.get(alpha_key).float()) if alpha_key in tf else None
            down, up = finite(tf.get(key), tf, key), finite(tf.get(up_key), tf, up_key)
            _check_factors(tf, name, down, up)
            layers.append(LoraLayer(name, down, up, alpha))
            used.update(k for k in (key, up_key, alpha_key) if k in tf)
    if not layers:
        raise CheckpointError(f"{tf.path}: not a LoRA file: no lora_down/lora_A weights")
    left = set(tf.keys()) - used
    if left:
        raise CheckpointError(
            f"{tf.path}: keys that belong to no LoRA layer (refused rather than merged in part): "
            f"{list_keys(left)}"
        )
    return layers


def is_product(down: Sequence[int], up: Sequence[int]) -> bool:
    """Whether factors of shapes ``down`` (rank, in[, k, k]) and ``up`` (out, rank[, ...]) multiply."""
    return len(down) in (2, 4) and len(up) == len(down) and up[1] == down[0]


def is_pointwise(up: Sequence[int]) -> bool:
    """Whether an up factor of shape ``up`` (out, rank[, k, k]) is a linear or 1x1 one, as the
    product :meth:`LoraLayer.delta` takes needs."""
    return tuple(up[2:]) in ((), (1, 1))


def fits_weight(down: Sequence[int], up: Sequence[int], weight: Sequence[int]) -> bool:
    """Whether the product of factors of these shapes, flattened as :meth:`LoraLayer.delta` takes
    it, is an update of a weight of shape ``weight``."""
    return up[0] == weight[0] and up[0] * math.prod(down[1:]) == math.prod(weight)


def _check_factors(tf: TensorFile, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if not is_product(down.shape, up.shape):
        raise CheckpointError(
            f"{tf.path}: layer {name!r}: factors of shapes {tuple(down.shape)} (down) and "
            f"{tuple(up.shape)} (up) do not make a low-rank product"
        )
    if not is_pointwise(up.shape):
        raise CheckpointError(f"{tf.path}: layer {name!r}: the up factor must be 1x1, got {tuple(up.shape)}")


def _kohya(path: str) -> str:
    return path.replace(".", "_")


def layer_names(base: UNetBase) -> dict[str, nn.Module]:
    """Every name a LoRA file may give a layer of ``base``, and the layer."""
    names: dict[str, nn.Module] = {}
    unet = base.unet
    for path, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        names["lora_unet_" + _kohya(path)] = m
        names["unet." + path] = m
        try:  # the original layout's name, as SDXL LoRAs give it
            original = unet_rule(path + ".weight", unet.config, "").file[: -len(".weight")]
        except KeyError:
            continue
        names.setdefault("lora_unet_" + _kohya(original), m)
    encoders = [("te", "text_encoder", base.text_encoder)]
    if base.text_encoder_2 is not None:
        encoders = [
            ("te1", "text_encoder", base.text_encoder),
            ("te2", "text_encoder_2", base.text_encoder_2),
        ]
    for kohya, diffusers, te in encoders:
        prefix = text_key_prefix(te)  # names as CLIP files give them: text_model.encoder...
        for path, m in te.named_modules():
            if isinstance(m, nn.Linear):
                full = path if path == "text_projection" else prefix + path  # beside text_model
                names[f"lora_{kohya}_" + _kohya(full)] = m
                names[f"{diffusers}.{full}"] = m
    return names


def merge_loras(base: UNetBase, loras: Sequence[tuple[str | Path, float]]) -> int:
    """Add each LoRA ``(path, scale)`` into ``base``'s weights, in place; the number of layers
    changed. Every file is read and every layer checked against ``base`` first, so an error
    leaves the weights as they were."""
    targets = layer_names(base)
    planned: list[tuple[nn.Module, LoraLayer, float]] = []
    for path, scale in loras:
        if not math.isfinite(scale):
            raise ValueError(f"LoRA {path}: scale must be a finite number, got {scale}")
        layers = read_lora(path)
        unknown = [layer.name for layer in layers if layer.name not in targets]
        if unknown:
            raise CheckpointError(
                f"{path}: {len(unknown)} of its {len(layers)} layers are not layers of this "
                f"{base.family.value} model (a LoRA for another model family?): {list_keys(unknown, 8)}"
            )
        for layer in layers:
            module = targets[layer.name]
            weight = module.weight
            if not fits_weight(layer.down.shape, layer.up.shape, weight.shape):
                raise CheckpointError(
                    f"{path}: layer {layer.name!r} makes a {layer.up.shape[0]} x {_fan_in(layer)} update, "
                    f"but the model's weight there is {tuple(weight.shape)}"
                )
            planned.append((module, layer, scale))
    with torch.no_grad():
        for module, layer, scale in planned:
            w = module.weight
            w.copy_((w.float() + scale * layer.delta(w.shape).to(w.device)).to(w.dtype))
    return len({id(m) for m, _, _ in planned})


def _fan_in(layer: LoraLayer) -> int:
    return math.prod(layer.down.shape[1:])
