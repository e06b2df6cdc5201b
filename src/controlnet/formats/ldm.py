"""Tensor names of the original (CompVis ldm / Stability sgm / lllyasviel cldm) layout.

Each function takes one of our keys (diffusers' module names, which our ControlNet shares) and
returns its :class:`Rule`: the original name and how the tensor is stored there. The rules are
derived from the architecture (layers per block, which levels attend), not tabulated, so they hold
for every size of the same structure - the real SD models and the tiny test models alike.

UNet (``model.diffusion_model.*``) and the ControlNet's copy (``control_model.*``):

    conv_in                          input_blocks.0.0
    time_embedding.linear_1 / _2     time_embed.0 / time_embed.2
    add_embedding.linear_1 / _2      label_emb.0.0 / label_emb.0.2          (SDXL)
    down_blocks.b.resnets.j          input_blocks.{1 + b(L+1) + j}.0        (L = layers per block)
    down_blocks.b.attentions.j       input_blocks.{1 + b(L+1) + j}.1
    down_blocks.b.downsamplers.0     input_blocks.{1 + b(L+1) + L}.0.op
    mid_block.resnets.0 / .1         middle_block.0 / middle_block.2
    mid_block.attentions.0           middle_block.1
    up_blocks.b.resnets.j            output_blocks.{b(L+1) + j}.0
    up_blocks.b.attentions.j         output_blocks.{b(L+1) + j}.1
    up_blocks.b.upsamplers.0         output_blocks.{b(L+1) + L}.{2 if the level attends else 1}
    conv_norm_out / conv_out         out.0 / out.2
    resnet: norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1, norm2 out_layers.0,
            conv2 out_layers.3, conv_shortcut skip_connection; attention blocks keep their names.

ControlNet only: ``controlnet_cond_embedding.conv_in`` = ``input_hint_block.0``, its
``blocks.k`` = ``input_hint_block.{2k + 2}``, its ``conv_out`` = the last even index;
``controlnet_down_blocks.i`` = ``zero_convs.i.0``; ``controlnet_mid_block`` = ``middle_block_out.0``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .keymap import Op, Rule

__all__ = ["clip_rule", "controlnet_rule", "openclip_rule", "unet_rule", "vae_rule"]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _no_name(key: str, what: str) -> KeyError:
    return KeyError(f"{key!r} has no name in the original {what} layout")


def _resnet(rest: list[str], table: Mapping[str, str]) -> str:
    return ".".join([table.get(rest[0], rest[0]), *rest[1:]])


def unet_rule(key: str, config: Mapping[str, Any], prefix: str) -> Rule:
    """Rule of a UNet (or ControlNet copy) key; ``config`` is the diffusers UNet config."""
    L = int(config["layers_per_block"])
    p = key.split(".")
    head = p[0]
    simple = {
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for ours, theirs in simple.items():
        if key.startswith(ours + "."):
            return Rule(key, prefix + theirs + key[len(ours) :])
    if head in ("down_blocks", "up_blocks") and len(p) >= 5:
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if head == "down_blocks":
            idx = 1 + b * (L + 1)
            if kind == "resnets":
                name = f"input_blocks.{idx + j}.0.{_resnet(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                name = f"input_blocks.{idx + j}.1.{'.'.join(rest)}"
            elif kind == "downsamplers" and rest[0] == "conv":
                name = f"input_blocks.{idx + L}.0.op.{'.'.join(rest[1:])}"
            else:
                raise _no_name(key, "UNet")
        else:
            idx = b * (L + 1)
            attends = str(config["up_block_types"][b]).startswith("CrossAttn")
            if kind == "resnets":
                name = f"output_blocks.{idx + j}.0.{_resnet(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                name = f"output_blocks.{idx + j}.1.{'.'.join(rest)}"
            elif kind == "upsamplers":
                name = f"output_blocks.{idx + L}.{2 if attends else 1}.{'.'.join(rest)}"
            else:
                raise _no_name(key, "UNet")
        return Rule(key, prefix + name)
    if head == "mid_block" and len(p) >= 4:
        kind, j, rest = p[1], int(p[2]), p[3:]
        if kind == "resnets":
            return Rule(key, prefix + f"middle_block.{2 * j}.{_resnet(rest, _UNET_RESNET)}")
        if kind == "attentions" and j == 0:
            return Rule(key, prefix + f"middle_block.1.{'.'.join(rest)}")
    raise _no_name(key, "UNet")


def controlnet_rule(key: str, config: Mapping[str, Any], hint_blocks: int, prefix: str) -> Rule:
    """Rule of a ControlNet key; ``hint_blocks`` is the number of convs between the hint
    encoder's first and last (6 for the released models)."""
    hint = "controlnet_cond_embedding."
    if key.startswith(hint + "conv_in."):
        return Rule(key, prefix + "input_hint_block.0." + key[len(hint + "conv_in.") :])
    if key.startswith(hint + "conv_out."):
        return Rule(key, prefix + f"input_hint_block.{2 * hint_blocks + 2}." + key[len(hint + "conv_out.") :])
    m = re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key)
    if m:
        return Rule(key, prefix + f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}")
    m = re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key)
    if m:
        return Rule(key, prefix + f"zero_convs.{m[1]}.0.{m[2]}")
    if key.startswith("controlnet_mid_block."):
        return Rule(key, prefix + "middle_block_out.0." + key[len("controlnet_mid_block.") :])
    return unet_rule(key, config, prefix)


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_rule(key: str, config: Mapping[str, Any], prefix: str) -> Rule:
    """Rule of an ``AutoencoderKL`` key. The decoder's levels run in the opposite order in the
    original (``up.0`` is the last, full-resolution level); the middle attention's projections
    are 1x1 convolutions there."""
    n = len(config["block_out_channels"])
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return Rule(key, prefix + key)
    coder, rest = p[0], p[1:]
    if rest[0] == "conv_norm_out":
        return Rule(key, prefix + f"{coder}.norm_out.{'.'.join(rest[1:])}")
    if rest[0] in ("down_blocks", "up_blocks"):
        i, kind, j, tail = int(rest[1]), rest[2], int(rest[3]), rest[4:]
        level = i if rest[0] == "down_blocks" else n - 1 - i
        where = f"{coder}.{'down' if rest[0] == 'down_blocks' else 'up'}.{level}"
        if kind == "resnets":
            return Rule(key, prefix + f"{where}.block.{j}.{_resnet(tail, {'conv_shortcut': 'nin_shortcut'})}")
        if kind in ("downsamplers", "upsamplers"):
            return Rule(key, prefix + f"{where}.{kind[:-2]}.{'.'.join(tail)}")
    if rest[0] == "mid_block":
        kind, j, tail = rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return Rule(key, prefix + f"{coder}.mid.block_{j + 1}.{'.'.join(tail)}")
        if kind == "attentions":
            sub = ".".join(tail[:-1])
            param = tail[-1]
            op = Op.CONV1X1 if param == "weight" and sub != "group_norm" else Op.SAME
            return Rule(key, prefix + f"{coder}.mid.attn_1.{_VAE_ATTN[sub]}.{param}", op)
    raise _no_name(key, "VAE")


def clip_rule(key: str, prefix: str, canonical: str = "") -> Rule:
    """HF CLIP text model (SD1's ``cond_stage_model.transformer``, SDXL's first encoder): the
    original holds a transformers model, so names only gain a prefix. ``canonical`` is what our
    module's keys lack of the usual ``text_model.`` names (see build.text_key_prefix)."""
    return Rule(key, prefix + canonical + key)


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_rule(key: str, prefix: str, canonical: str = "") -> Rule:
    """HF CLIP text model key -> OpenCLIP text tower (SD2's ``cond_stage_model.model``, SDXL's
    second encoder). OpenCLIP stacks q, k, v in one ``in_proj`` and multiplies by
    ``text_projection`` from the right (HF stores the transpose)."""
    ours, key = key, canonical + key
    fixed = {
        "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", Op.SAME),
        "text_model.embeddings.position_embedding.weight": ("positional_embedding", Op.SAME),
        "text_model.final_layer_norm.weight": ("ln_final.weight", Op.SAME),
        "text_model.final_layer_norm.bias": ("ln_final.bias", Op.SAME),
        "text_projection.weight": ("text_projection", Op.TRANSPOSE),
    }
    if key in fixed:
        name, op = fixed[key]
        return Rule(ours, prefix + name, op)
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        layer, sub, param = m.groups()
        where = f"transformer.resblocks.{layer}"
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", sub)
        if qkv:
            return Rule(ours, prefix + f"{where}.attn.in_proj_{param}", Op.QKV, "qkv".index(qkv[1]))
        if sub in _OPENCLIP_LAYER:
            return Rule(ours, prefix + f"{where}.{_OPENCLIP_LAYER[sub]}.{param}")
    raise _no_name(key, "OpenCLIP")
