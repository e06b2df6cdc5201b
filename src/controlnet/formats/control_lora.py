"""Control-LoRA files (Stability AI's ``control-lora``): a ControlNet stored as low-rank changes to
the UNet it was copied from, a tenth of a full ControlNet's size.

The layout, in the original (ldm) names without a prefix:
- the marker ``lora_controlnet``;
- for convolution and linear layers of the trainable copy, ``<layer>.down`` (rank, in[, k, k])
  and ``<layer>.up`` (out, rank[, 1, 1]): the layer's weight is the base UNet's plus
  ``up @ down`` (no alpha: scale 1);
- every other tensor whole: biases, norms, embeddings, and the parts a UNet has no twin of, the
  hint encoder (``input_hint_block.*``), the zero convolutions (``zero_convs.*``) and
  ``middle_block_out.*``;
- a tensor the file does not hold is the base UNet's own.

So a Control-LoRA is loaded onto a base model: the UNet the ControlNet will run beside, as it is
(a fine-tune, LoRAs merged in), as ComfyUI, the A1111 extension and diffusers build it. Every key
is checked against that UNet's ControlNet before anything is built: a file for another family, a
stray key, a factor that does not fit or a missing hint encoder is refused whole.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..families.sd.configs import Family, family_of_unet_config
from ..families.sd.controlnet import ControlNet, ControlNetConfig
from .build import build_controlnet, family_from_context, hint_config_from_shapes, numbered
from .checkpoint import CheckpointError, TensorFile, list_keys
from .keymap import Rule, finite, shapes_of
from .ldm import controlnet_rule
from .lora import LoraLayer, fits_weight, is_pointwise, is_product

__all__ = ["MARKER", "family_of", "hint_config", "is_control_lora", "load_control_lora", "low_rank_layers"]

MARKER = "lora_controlnet"
DOWN, UP = ".down", ".up"


def is_control_lora(tf: TensorFile) -> bool:
    return MARKER in tf


def low_rank_layers(tf: TensorFile) -> dict[str, tuple[str, str]]:
    """Layer name -> (down key, up key) of every low-rank layer; an unpaired factor is an error."""
    layers: dict[str, tuple[str, str]] = {}
    for key in tf:
        if key.endswith(DOWN):
            name = key[: -len(DOWN)]
            if name + UP not in tf:
                raise CheckpointError(f"{tf.path}: {key!r} has no {name + UP!r} beside it")
            layers[name] = (key, name + UP)
        elif key.endswith(UP) and key[: -len(UP)] + DOWN not in tf:
            raise CheckpointError(f"{tf.path}: {key!r} has no {key[: -len(UP)] + DOWN!r} beside it")
    return layers


def _weight_shapes(tf: TensorFile) -> dict[str, tuple[int, ...]]:
    """The whole tensors' shapes, and for each low-rank layer ``<layer>.weight``: (out, in, ...)."""
    shapes = {k: tuple(s) for k, s in tf.shapes.items() if not k.endswith((DOWN, UP)) and k != MARKER}
    for name, (down, up) in low_rank_layers(tf).items():
        for key in (down, up):
            if len(tf.shapes[key]) < 2:
                raise CheckpointError(
                    f"{tf.path}: {key!r} has shape {tuple(tf.shapes[key])}; a low-rank factor is a matrix "
                    "or a conv kernel"
                )
        shapes[name + ".weight"] = (tf.shapes[up][0], *tf.shapes[down][1:])
    return shapes


def family_of(tf: TensorFile) -> Family:
    """The family the file was made for, from its cross-attention width."""
    return family_from_context(_weight_shapes(tf), "", str(tf.path))


def hint_config(tf: TensorFile) -> ControlNetConfig:
    """The hint encoder's architecture, read off its convolutions' shapes."""
    idx = numbered(tf.shapes, r"input_hint_block\.(\d+)\.weight")
    if not idx:
        raise CheckpointError(f"{tf.path}: a Control-LoRA without a hint encoder (no input_hint_block.*)")
    return hint_config_from_shapes(tf.shapes, [f"input_hint_block.{i}" for i in idx])


def load_control_lora(
    tf: TensorFile, unet: UNet2DConditionModel, *, dtype: torch.dtype | None = None
) -> ControlNet:
    """The ControlNet of Control-LoRA ``tf`` on ``unet``: the UNet's encoder with the file's
    tensors and low-rank changes, in ``dtype`` (default: the UNet's), on the UNet's device. The
    sums are taken in float32 and rounded once."""
    _check_family(tf, unet)
    config = hint_config(tf)
    unet_config: dict[str, Any] = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cn = build_controlnet(unet_config, config)  # on the meta device: every tensor is assigned below
    shapes = shapes_of(cn)
    hint_blocks = 2 * (len(config.hint_block_channels) - 1)
    rules = {r.file: r for r in (controlnet_rule(k, unet_config, hint_blocks, "") for k in shapes)}
    layers = low_rank_layers(tf)
    base = unet.state_dict()
    _verify(tf, rules, shapes, layers, set(base))

    device = unet.conv_in.weight.device
    dtype = dtype or unet.conv_in.weight.dtype
    state: dict[str, torch.Tensor] = {}
    for file_key, r in rules.items():
        # the file's tensor, else (checked: the UNet has a twin) the UNet's own
        t = r.to_model(finite(tf.get(file_key), tf, file_key)).to(device) if file_key in tf else base[r.ours]
        name = file_key.removesuffix(".weight")
        if name in layers and file_key.endswith(".weight"):
            down, up = (finite(tf.get(k), tf, k).to(device) for k in layers[name])
            t = t.float() + LoraLayer(name, down, up, alpha=None).delta(t.shape)
        # always a copy: the ControlNet must not share the UNet's storage
        state[r.ours] = t.to(dtype=dtype, copy=True) if t.is_floating_point() else t.clone()
    cn.load_state_dict(state, assign=True)
    left = [n for n, t in [*cn.named_parameters(), *cn.named_buffers()] if t.is_meta]
    if left:  # a bug of ours, not the file's
        raise RuntimeError(f"internal error: Control-LoRA: tensors left without values: {list_keys(left)}")
    return cn


def _check_family(tf: TensorFile, unet: UNet2DConditionModel) -> None:
    try:
        theirs = family_of(tf)
    except CheckpointError:
        return  # an architecture of its own: the key and shape checks below decide
    ours = family_of_unet_config(unet.config)
    if theirs is not ours:
        raise CheckpointError(
            f"{tf.path}: a Control-LoRA for {theirs.label}, but the base model is {ours.label}"
        )


def _verify(
    tf: TensorFile,
    rules: dict[str, Rule],
    shapes: dict[str, tuple[int, ...]],
    layers: dict[str, tuple[str, str]],
    twins: set[str],
) -> None:
    """Every key a tensor of this ControlNet or a fitting factor pair; every tensor the UNet has no
    twin of (``twins``: the UNet's keys) in the file."""
    factor_keys = {k for pair in layers.values() for k in pair}
    problems = []
    unknown = [k for k in tf if k != MARKER and k not in factor_keys and k not in rules]
    unknown += [pair[0] for name, pair in layers.items() if name + ".weight" not in rules]
    if unknown:
        problems.append(
            f"keys this model's ControlNet has no place for ({len(unknown)}): {list_keys(unknown)}"
        )
    mismatched = []
    for key in tf:
        if key in rules:
            want = rules[key].file_shape(shapes[rules[key].ours])
            if tuple(tf.shapes[key]) != want:
                mismatched.append(f"{key}: file {tuple(tf.shapes[key])}, model {want}")
    for name, (down, up) in layers.items():
        r = rules.get(name + ".weight")
        if r is None:
            continue
        d, u, w = tf.shapes[down], tf.shapes[up], shapes[r.ours]
        if not (is_product(d, u) and is_pointwise(u) and fits_weight(d, u, w)):
            mismatched.append(f"{name}: factors {tuple(d)} (down), {tuple(u)} (up) for a weight {tuple(w)}")
        if name + ".weight" in tf:
            problems.append(f"{name}: given both whole and as factors")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:10]))
    missing = [k for k, r in rules.items() if r.ours not in twins and k not in tf]
    if missing:
        problems.append(
            f"missing tensors the base UNet has no twin of ({len(missing)}): {list_keys(missing)}"
        )
    if problems:
        raise CheckpointError(f"{tf.path}: Control-LoRA: " + "; ".join(problems))
