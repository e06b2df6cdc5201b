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
from .build import numbered, shape_of
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, open_tensors, save_safetensors
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
        return shape_of(tf.shapes, MMDIT + key, str(tf.path))

    inner, channels, patch, _ = shape("x_embedder.proj.weight")
    blocks = numbered(tf.shapes, re.escape(MMDIT) + r"joint_blocks\.(\d+)\..*")
    dual = numbered(tf.shapes, re.escape(MMDIT) + r"joint_blocks\.(\d+)\.x_block\.attn2\..*")
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


Source = tuple[TensorFile, str]  # a file and the prefix a part's keys have in it


def _sources(tf: TensorFile, folder: Path | None) -> dict[str, Source]:
    """Where each part of the model is: inside the single file, else (in a folder) in a file of
    its own, recognised by its keys (two CLIPs: the narrower is CLIP-L)."""
    found: dict[str, Source] = {"transformer": (tf, MMDIT)}
    if tf.with_prefix(VAE):
        found["vae"] = (tf, VAE)
    for part, prefix in TEXT.items():
        if tf.with_prefix(prefix):
            found[part] = (tf, prefix)
    if folder is None:
        return found
    clips = []
    for path in sorted(folder.glob("*.safetensors")):
        if path == tf.path:
            continue
        other = open_tensors(path)
        if "encoder.conv_in.weight" in other and "decoder.conv_out.weight" in other:
            found.setdefault("vae", (other, ""))
        elif "encoder.block.0.layer.0.SelfAttention.q.weight" in other:
            found.setdefault("text_encoder_3", (other, ""))
        elif "text_model.embeddings.token_embedding.weight" in other:
            clips.append(other)
    clips.sort(key=lambda c: c.shapes["text_model.embeddings.token_embedding.weight"][1])
    for part, clip in zip(("text_encoder", "text_encoder_2"), clips):
        found.setdefault(part, (clip, ""))
    return found


def load_sd3_single_file(
    tf: TensorFile, *, folder: Path | None = None, dtype: torch.dtype | None = None
) -> SD3Base:
    """The model of Stability AI's single file, its parts from inside it, else (``folder``) from
    the files beside it; T5's tokenizer.json beside it when it has T5."""
    spec = SPECS["sd3"]
    parts_at = _sources(tf, folder)
    missing = [p for p in ("vae", "text_encoder", "text_encoder_2") if p not in parts_at]
    if missing:
        where = "in it or beside it" if folder is not None else "in it"
        raise CheckpointError(
            f"{tf.path}: an SD3 model needs its {', '.join(missing)} {where} (the VAE, CLIP-L and CLIP-G; "
            "T5 may be left out)"
        )
    config = mmdit_config(tf)
    transformer = build_part(spec, "transformer", config, str(tf.path))
    inner, last = config["num_attention_heads"] * HEAD, config["num_layers"] - 1
    transformer = load_into(
        transformer,
        tf,
        lambda ks: [mmdit_rule(k, inner, last) for k in ks],
        present=tf.with_prefix(MMDIT),
        what="transformer",
        dtype=dtype,
    )
    vtf, vprefix = parts_at["vae"]
    vae_cfg = vae_config_original_names(vtf.shapes, vprefix, Family.SD1, str(vtf.path))
    vae_cfg.update(SD3_VAE, use_quant_conv=vprefix + "quant_conv.weight" in vtf)
    vae_cfg["use_post_quant_conv"] = vprefix + "post_quant_conv.weight" in vtf
    vae = load_into(
        build_part(spec, "vae", vae_cfg, str(vtf.path)),
        vtf,
        lambda ks: [vae_rule(k, vae_cfg, vprefix) for k in ks],
        present=vtf.with_prefix(vprefix) if vprefix else list(vtf),
        what="vae",
        dtype=dtype,
    )
    parts: dict[str, Any] = {"transformer": transformer, "vae": vae}
    for part in ("text_encoder", "text_encoder_2"):
        ctf, cprefix = parts_at[part]
        cfg = clip_config(ctf.shapes, cprefix, Family.SD1, str(ctf.path))
        # CLIP-L computes OpenAI's quick GELU, CLIP-G (OpenCLIP's bigG) the exact one
        cfg.update(
            architectures=["CLIPTextModelWithProjection"],
            hidden_act="gelu" if part == "text_encoder_2" else "quick_gelu",
        )
        parts[part] = fill_part(spec, part, build_part(spec, part, cfg, str(ctf.path)), ctf, cprefix, dtype)
    t5_tok = None
    if "text_encoder_3" in parts_at:
        ttf, tprefix = parts_at["text_encoder_3"]
        sub = _Sub(ttf, tprefix) if tprefix else ttf
        module = build_part(spec, "text_encoder_3", t5_config(sub), str(ttf.path))
        parts["text_encoder_3"] = fill_part(spec, "text_encoder_3", module, ttf, tprefix, dtype)
        t5_tok = t5_tokenizer(tf.path.parent)
    return spec.make(parts, t5_tok, spec.max_sequence_length, dict(SD3_SCHEDULE))


def sd3_folder_file(folder: Path) -> TensorFile | None:
    """The SD3 single file in ``folder`` (one whose parts may lie beside it), or None."""
    if not folder.is_dir():
        return None
    found = [tf for p in sorted(folder.glob("*.safetensors")) if is_sd3_single_file(tf := open_tensors(p))]
    if len(found) > 1:
        raise CheckpointError(
            f"{folder}: two SD3 models ({found[0].path.name}, {found[1].path.name}); keep one"
        )
    return found[0] if found else None


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
