"""Stability AI's single files of SD3 / SD3.5 (``sd3.5_large.safetensors``,
``sd3_medium_incl_clips_t5xxlfp16.safetensors``): the MMDiT in the reference implementation's
names, the VAE and the text encoders beside it.

    model.diffusion_model.*                 the MMDiT (mapped rule by rule below)
    first_stage_model.*                     the VAE, in the original (ldm) VAE names
    text_encoders.clip_l.transformer.*      CLIP-L (transformers' names)
    text_encoders.clip_g.transformer.*      CLIP-G (transformers' names)
    text_encoders.t5xxl.transformer.*       T5 (transformers' names), when the file holds it

The MMDiT fuses each stream's q, k, v in one ``qkv`` (thirds of its rows), and its last block's
text modulation and the final layer's hold (shift, scale) where diffusers has (scale, shift)::

    x_embedder.proj / pos_embed              pos_embed.proj / pos_embed.pos_embed
    t_embedder.mlp.0, .2                     time_text_embed.timestep_embedder.linear_1, _2
    y_embedder.mlp.0, .2                     time_text_embed.text_embedder.linear_1, _2
    joint_blocks.i.x_block.attn.qkv          transformer_blocks.i.attn.to_q | to_k | to_v
    joint_blocks.i.context_block.attn.qkv    .attn.add_q_proj | add_k_proj | add_v_proj
    ...attn.proj / .ln_q / .ln_k             .attn.to_out.0 / .norm_q / .norm_k
                                             (context: to_add_out, norm_added_q / _k)
    joint_blocks.i.x_block.attn2.*           .attn2.* (SD3.5 medium's dual attention)
    ...x_block.mlp.fc1, .fc2                 .ff.net.0.proj, .ff.net.2 (context_block: ff_context)
    ...x_block.adaLN_modulation.1            .norm1.linear (context_block: norm1_context.linear)
    final_layer.linear / adaLN_modulation.1  proj_out / norm_out.linear

A file without its text encoders (SD3.5's are published apart) is read from a folder that holds
them as separate files; T5's tokenizer comes as ``tokenizer.json`` beside the file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..families.sd.configs import Family
from ..families.sd3.base import SD3_SCHEDULE, SD3Base
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, save_safetensors
from .dit_base import SPECS, TIED, build_part, fill_part, t5_tokenizer
from .flux_files import t5_config
from .infer import clip_config, vae_config_original_names
from .keymap import Op, Rule, load_into, to_file
from .ldm import vae_rule

__all__ = [
    "MMDIT",
    "is_sd3_single_file",
    "load_sd3_single_file",
    "mmdit_config",
    "mmdit_rule",
    "save_sd3_single_file",
]

MMDIT = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
#: SD3's VAE: its latents' scale and shift (diffusers' config of SD3 and SD3.5)
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
HEAD = 64

_SIMPLE = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
_QKV = {
    "attn.to_q": ("x_block.attn", 0),
    "attn.to_k": ("x_block.attn", 1),
    "attn.to_v": ("x_block.attn", 2),
    "attn.add_q_proj": ("context_block.attn", 0),
    "attn.add_k_proj": ("context_block.attn", 1),
    "attn.add_v_proj": ("context_block.attn", 2),
    "attn2.to_q": ("x_block.attn2", 0),
    "attn2.to_k": ("x_block.attn2", 1),
    "attn2.to_v": ("x_block.attn2", 2),
}


def mmdit_rule(key: str, inner: int, last: int, prefix: str = MMDIT) -> Rule:
    """The rule of one of our (diffusers') SD3 transformer keys; ``last``: the last block's index
    (its text modulation is stored swapped)."""
    if key == "pos_embed.pos_embed":
        return Rule(key, prefix + "pos_embed")
    name, param = key.rsplit(".", 1)
    if name in _SIMPLE:
        return Rule(key, f"{prefix}{_SIMPLE[name]}.{param}")
    if name == "norm_out.linear":
        return Rule(key, f"{prefix}final_layer.adaLN_modulation.1.{param}", Op.SWAP)
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m:
        i, sub = int(m[1]), m[2]
        block = f"{prefix}joint_blocks.{i}."
        if sub in _NORMS:
            return Rule(key, f"{block}{_NORMS[sub]}.{param}")
        if sub in _BLOCK:
            op = Op.SWAP if sub == "norm1_context.linear" and i == last else Op.SAME
            return Rule(key, f"{block}{_BLOCK[sub]}.{param}", op)
        if sub in _QKV:
            where, third = _QKV[sub]
            return Rule(
                key, f"{block}{where}.qkv.{param}", Op.ROWS, rows=(third * inner, (third + 1) * inner)
            )
    raise KeyError(f"{key!r} has no name in the SD3 reference layout")


def is_sd3_single_file(tf: TensorFile) -> bool:
    return MMDIT + "joint_blocks.0.x_block.attn.qkv.weight" in tf


def mmdit_config(tf: TensorFile) -> dict[str, Any]:
    """diffusers ``SD3Transformer2DModel`` arguments read off the MMDiT's tensors (heads of 64
    channels, as in every SD3 and SD3.5 model)."""

    def shape(key: str) -> tuple[int, ...]:
        if MMDIT + key not in tf:
            raise CheckpointError(
                f"{tf.path}: expected {MMDIT + key!r} (cannot read the architecture without it)"
            )
        return tuple(tf.shapes[MMDIT + key])

    inner, channels, patch, _ = shape("x_embedder.proj.weight")
    blocks = sorted(
        {int(m[1]) for k in tf if (m := re.match(re.escape(MMDIT) + r"joint_blocks\.(\d+)\.", k))}
    )
    dual = sorted(
        {
            int(m[1])
            for k in tf
            if (m := re.match(re.escape(MMDIT) + r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))
        }
    )
    caption, joint = shape("context_embedder.weight")
    side = math.isqrt(shape("pos_embed")[1])
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": channels,
        "num_layers": len(blocks),
        "attention_head_dim": HEAD,
        "num_attention_heads": inner // HEAD,
        "joint_attention_dim": joint,
        "caption_projection_dim": caption,
        "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
        "out_channels": shape("final_layer.linear.weight")[0] // (patch * patch),
        "pos_embed_max_size": side,
        "qk_norm": "rms_norm" if MMDIT + "joint_blocks.0.x_block.attn.ln_q.weight" in tf else None,
        "dual_attention_layers": dual,
    }


def load_sd3_single_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> SD3Base:
    spec = SPECS["sd3"]
    missing = [p for p in ("text_encoder", "text_encoder_2") if not tf.with_prefix(TEXT[p])]
    if not tf.with_prefix(VAE):
        missing.insert(0, "vae")
    if missing:
        raise CheckpointError(
            f"{tf.path}: an SD3 file without its {', '.join(missing)} (first_stage_model.*, "
            "text_encoders.clip_l/clip_g.*): convert it with its parts from a diffusers folder"
        )
    config = mmdit_config(tf)
    transformer = build_part(spec, "transformer", config, str(tf.path))
    inner, last = config["num_attention_heads"] * HEAD, config["num_layers"] - 1
    present = tf.with_prefix(MMDIT)
    transformer = load_into(
        transformer,
        tf,
        lambda ks: [mmdit_rule(k, inner, last) for k in ks],
        present=present,
        what="transformer",
        dtype=dtype,
    )
    vae_cfg = vae_config_original_names(tf.shapes, VAE, Family.SD1, str(tf.path))
    vae_cfg.update(
        SD3_VAE, latent_channels=vae_cfg["latent_channels"], use_quant_conv=VAE + "quant_conv.weight" in tf
    )
    vae_cfg["use_post_quant_conv"] = VAE + "post_quant_conv.weight" in tf
    vae = build_part(spec, "vae", vae_cfg, str(tf.path))
    vae = load_into(
        vae,
        tf,
        lambda ks: [vae_rule(k, vae_cfg, VAE) for k in ks],
        present=tf.with_prefix(VAE),
        what="vae",
        dtype=dtype,
    )
    parts: dict[str, Any] = {"transformer": transformer, "vae": vae}
    for part in ("text_encoder", "text_encoder_2"):
        cfg = clip_config(tf.shapes, TEXT[part], Family.SD1, str(tf.path))
        # CLIP-L computes OpenAI's quick GELU, CLIP-G (OpenCLIP's bigG) the exact one
        cfg.update(
            architectures=["CLIPTextModelWithProjection"],
            hidden_act="gelu" if part == "text_encoder_2" else "quick_gelu",
        )
        parts[part] = fill_part(spec, part, build_part(spec, part, cfg, str(tf.path)), tf, TEXT[part], dtype)
    t5_tok = None
    if tf.with_prefix(TEXT["text_encoder_3"]):
        sub = _Sub(tf, TEXT["text_encoder_3"])
        module = build_part(spec, "text_encoder_3", t5_config(sub), str(tf.path))
        parts["text_encoder_3"] = fill_part(spec, "text_encoder_3", module, tf, TEXT["text_encoder_3"], dtype)
        t5_tok = t5_tokenizer(tf.path.parent)
    return spec.make(parts, t5_tok, spec.max_sequence_length, dict(SD3_SCHEDULE))


class _Sub(TensorFile):
    """The tensors of ``tf`` under ``prefix``, with the prefix taken off (shapes only)."""

    def __init__(self, tf: TensorFile, prefix: str) -> None:
        shapes = {k[len(prefix) :]: s for k, s in tf.shapes.items() if k.startswith(prefix)}
        super().__init__(tf.path, shapes, {k: torch.float32 for k in shapes}, lambda k: tf.get(prefix + k))


def save_sd3_single_file(base: SD3Base, path: Path, *, overwrite: bool = False) -> list[Path]:
    """The model as Stability AI's single file (T5's tokenizer.json beside it when it has T5)."""
    config = base.transformer.config
    inner, last = config.num_attention_heads * config.attention_head_dim, config.num_layers - 1
    state = base.transformer.state_dict()
    tensors = to_file(state, [mmdit_rule(k, inner, last) for k in state])
    v_state = base.vae.state_dict()
    tensors.update(to_file(v_state, [vae_rule(k, dict(base.vae.config), VAE) for k in v_state]))
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = base.modules().get(part)
        if module is None:
            continue
        canonical = "" if part == "text_encoder_3" or hasattr(module, "text_model") else "text_model."
        state = {
            k: v for k, v in module.state_dict().items() if not (part == "text_encoder_3" and k == TIED[0])
        }
        tensors.update({TEXT[part] + canonical + k: v for k, v in state.items()})
    outputs = [path]
    if base.text_encoder_3 is not None:
        outputs.append(path.parent / "tokenizer.json")
    with atomic_outputs(*outputs, overwrite=overwrite) as tmp:
        save_safetensors(tensors, tmp[0], {"format": "pt"})
        if len(tmp) > 1:
            tmp[1].write_text(base.tokenizer_3.backend_tokenizer.to_str())
    return outputs
