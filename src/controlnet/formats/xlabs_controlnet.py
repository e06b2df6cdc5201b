"""XLabs' Flux ControlNet files, read and written by the shared reader of transformer ControlNets
(:mod:`.dit_controlnet`): the copied double blocks in Black Forest Labs' names (read with the
row-slicing rules of BFL's transformer, :mod:`.flux_bfl`), the hint encoder as a plain sequence of
convolutions (``input_hint_block.0``, ``.2``, ...: a conv in, two per halving, a conv out; Flux.1's
8x is ``.0`` to ``.14``), and the hint's embedding named ``pos_embed_input``. The files hold no
config: the architecture is read off the tensors, the rotary axes are Flux.1's for its 128-channel
heads.
"""

from __future__ import annotations

import re
from typing import Any

from ..families.flux.controlnet import FluxControlNetConfig
from .build import numbered, shape_of
from .checkpoint import TensorFile
from .flux_bfl import bfl_rule, bfl_shared_config
from .keymap import Rule, to_file

__all__ = ["MARKERS", "inferred", "is_xlabs", "rules", "to_xlabs"]

#: keys every XLabs ControlNet holds
MARKERS = ("input_hint_block.0.weight", "pos_embed_input.weight", "double_blocks.0.img_attn.qkv.weight")


def is_xlabs(tf: TensorFile) -> bool:
    return all(k in tf for k in MARKERS)


def _rule(key: str, inner: int, hint_convs: int) -> Rule:
    """Our key -> XLabs' name (``hint_convs``: the hint encoder's convs between first and last)."""
    if key.startswith("controlnet_x_embedder."):
        return Rule(key, "pos_embed_input." + key.removeprefix("controlnet_x_embedder."))
    if key.startswith("controlnet_blocks."):
        return Rule(key, key)
    m = re.fullmatch(r"input_hint_block\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)", key)
    if m:
        index = 0 if m[1] == "conv_in" else 2 * hint_convs + 2 if m[1] == "conv_out" else 2 * int(m[2]) + 2
        return Rule(key, f"input_hint_block.{index}.{m[3]}")
    return bfl_rule(key, inner, "")


def rules(keys: Any, inner: int, hint_convs: int) -> list[Rule]:
    """The rules between our keys and XLabs' names (read and written alike)."""
    return [_rule(k, inner, hint_convs) for k in keys]


def to_xlabs(cn: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A pixel-hint Flux ControlNet's state in XLabs' names; ValueError for a Union one (the
    layout holds no control modes)."""
    if cn.config.num_mode is not None:
        raise ValueError(
            "XLabs' layout (the published one of pixel-hint Flux ControlNets) holds no Union "
            "control modes: save this one in our format ('controlnet') or diffusers'"
        )
    return to_file(state, rules(state, cn.inner_dim, len(cn.input_hint_block.blocks)))


def inferred(tf: TensorFile) -> tuple[dict[str, Any], FluxControlNetConfig]:
    """(transformer config, ControlNet config) read off an XLabs file's tensors."""
    convs = numbered(tf.shapes, r"input_hint_block\.(\d+)\.weight")
    config = FluxControlNetConfig(
        num_layers=len(numbered(tf.shapes, r"double_blocks\.(\d+)\..*")),
        num_single_layers=0,
        pixel_hint_channels=shape_of(tf.shapes, f"input_hint_block.{convs[-1]}.weight", str(tf.path))[0],
        pixel_hint_scale=2 ** ((len(convs) - 2) // 2),  # a conv in, two per halving, a conv out
    )
    return bfl_shared_config(tf, ""), config
