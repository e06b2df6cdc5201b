"""Black Forest Labs' layout of the Flux.1 transformer (``flux1-dev.safetensors``, also inside
ComfyUI checkpoints under ``model.diffusion_model.``), mapped to diffusers' names rule by rule.

BFL fuses what diffusers keeps apart: a double block's image and text attention each hold one
``qkv`` projection (q, k and v as thirds of its rows); a single block's ``linear1`` holds q, k, v
and the MLP's input projection one after another; the final layer's modulation holds (shift,
scale) where diffusers has (scale, shift). The rules (:class:`~.keymap.Rule` with ``Op.ROWS`` and
``Op.SWAP``) read and write, so a file converted to ours and back is the same file::

    img_in / txt_in                       x_embedder / context_embedder
    time_in / vector_in / guidance_in     time_text_embed.timestep_embedder / text_embedder /
      .in_layer, .out_layer                 guidance_embedder .linear_1, .linear_2
    double_blocks.i.img_mod.lin           transformer_blocks.i.norm1.linear      (txt_mod: norm1_context)
    double_blocks.i.img_attn.qkv          .attn.to_q | to_k | to_v               (txt_attn: add_q/k/v_proj)
    double_blocks.i.img_attn.norm.query_norm.scale / key_norm   .attn.norm_q / norm_k (txt: norm_added_q/k)
    double_blocks.i.img_attn.proj         .attn.to_out.0                         (txt_attn.proj: to_add_out)
    double_blocks.i.img_mlp.0 / .2        .ff.net.0.proj / .ff.net.2             (txt_mlp: ff_context)
    single_blocks.i.linear1               single_transformer_blocks.i.attn.to_q | to_k | to_v | proj_mlp
    single_blocks.i.linear2               .proj_out
    single_blocks.i.norm.query_norm / key_norm   .attn.norm_q / norm_k
    single_blocks.i.modulation.lin        .norm.linear
    final_layer.linear                    proj_out
    final_layer.adaLN_modulation.1        norm_out.linear (halves swapped)
"""

from __future__ import annotations

import re
from typing import Any

from .build import numbered, shape_of
from .checkpoint import CheckpointError, TensorFile
from .keymap import Op, Rule

__all__ = [
    "FLUX_AXES",
    "FLUX_HEAD",
    "PREFIXES",
    "bfl_prefix",
    "bfl_rule",
    "bfl_shared_config",
    "bfl_transformer_config",
    "is_bfl_transformer",
]

#: Flux.1's head size, and its split by the rotary axes (what a file without a config implies)
FLUX_HEAD, FLUX_AXES = 128, (16, 56, 56)
#: where a file keeps the transformer: alone, or in a ComfyUI-style whole checkpoint
PREFIXES = ("", "model.diffusion_model.")
#: a whole transformer (XLabs' ControlNets hold the first two but no final layer)
_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "img_in.weight", "final_layer.linear.weight")

_SIMPLE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_QKV = {"to_q": ("img", 0), "to_k": ("img", 1), "to_v": ("img", 2)}
_QKV.update({"add_q_proj": ("txt", 0), "add_k_proj": ("txt", 1), "add_v_proj": ("txt", 2)})
_LINEAR1 = ("to_q", "to_k", "to_v")  # then proj_mlp


def is_bfl_transformer(tf: TensorFile) -> bool:
    return bfl_prefix(tf) is not None


def bfl_prefix(tf: TensorFile) -> str | None:
    """The prefix under which the file holds a BFL transformer, or None."""
    for prefix in PREFIXES:
        if all(prefix + m in tf for m in _MARKERS):
            return prefix
    return None


def bfl_rule(key: str, inner: int, prefix: str = "") -> Rule:
    """The rule of one of our (diffusers') transformer keys; ``inner`` is the model's width."""
    name, param = key.rsplit(".", 1)
    if name in _SIMPLE:
        return Rule(key, f"{prefix}{_SIMPLE[name]}.{param}")
    if name == "norm_out.linear":
        return Rule(key, f"{prefix}final_layer.adaLN_modulation.1.{param}", Op.SWAP)
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
    if m:
        i, rest = m[1], m[2]
        block = f"{prefix}double_blocks.{i}."
        if rest in _NORMS:
            return Rule(key, block + _NORMS[rest])
        sub, param = rest.rsplit(".", 1)
        if sub in _DOUBLE:
            return Rule(key, f"{block}{_DOUBLE[sub]}.{param}")
        proj = sub.removeprefix("attn.")
        if proj in _QKV:
            stream, third = _QKV[proj]
            return Rule(
                key, f"{block}{stream}_attn.qkv.{param}", Op.ROWS, rows=(third * inner, (third + 1) * inner)
            )
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", key)
    if m:
        i, rest = m[1], m[2]
        block = f"{prefix}single_blocks.{i}."
        sub, param = rest.rsplit(".", 1)
        norms = {"attn.norm_q": "norm.query_norm.scale", "attn.norm_k": "norm.key_norm.scale"}
        if sub in norms:
            return Rule(key, block + norms[sub])
        if sub == "proj_out":
            return Rule(key, f"{block}linear2.{param}")
        if sub == "norm.linear":
            return Rule(key, f"{block}modulation.lin.{param}")
        proj = sub.removeprefix("attn.")
        if proj in _LINEAR1:
            k = _LINEAR1.index(proj)
            return Rule(key, f"{block}linear1.{param}", Op.ROWS, rows=(k * inner, (k + 1) * inner))
        if sub == "proj_mlp":  # the MLP's rows follow q, k, v; the file's shape says how many
            return Rule(key, f"{block}linear1.{param}", Op.ROWS, rows=(3 * inner, 3 * inner + 4 * inner))
    raise KeyError(f"{key!r} has no name in Black Forest Labs' Flux layout")


def bfl_shared_config(tf: TensorFile, prefix: str) -> dict[str, Any]:
    """The fields a Flux transformer and its ControlNets share (diffusers' names), read off the
    BFL-named tensors of a transformer or of XLabs' ControlNet (Flux.1's rotary split for its
    128-channel heads)."""

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(tf.shapes, prefix + key, str(tf.path))

    inner, channels = shape("img_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if head != FLUX_HEAD:
        raise CheckpointError(
            f"{tf.path}: heads of {head} channels, not Flux.1's {FLUX_HEAD}: its rotary axes are unknown"
        )
    return {
        "patch_size": 1,
        "in_channels": channels,
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": prefix + "guidance_in.in_layer.weight" in tf,
        "axes_dims_rope": list(FLUX_AXES),
    }


def bfl_transformer_config(tf: TensorFile, prefix: str) -> dict[str, Any]:
    """diffusers ``FluxTransformer2DModel`` arguments read off a BFL file's tensors."""

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(tf.shapes, prefix + key, str(tf.path))

    shared = bfl_shared_config(tf, prefix)
    inner = shared["attention_head_dim"] * shared["num_attention_heads"]
    mlp = shape("double_blocks.0.img_mlp.0.weight")[0]
    if mlp != 4 * inner:
        raise CheckpointError(
            f"{tf.path}: an MLP of {mlp} channels for width {inner}; Flux.1's is 4 times as wide"
        )
    return {
        **shared,
        "out_channels": shape("final_layer.linear.weight")[0],
        "num_layers": len(numbered(tf.shapes, re.escape(prefix) + r"double_blocks\.(\d+)\..*")),
        "num_single_layers": len(numbered(tf.shapes, re.escape(prefix) + r"single_blocks\.(\d+)\..*")),
    }
