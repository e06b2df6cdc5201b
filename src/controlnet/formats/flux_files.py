"""A Flux.1 model as the separate files people download from Black Forest Labs and keep for
ComfyUI, in one folder, each file recognised by its keys (not its name):

    flux1-dev.safetensors      the transformer, BFL layout (:mod:`.flux_bfl`)
    ae.safetensors             the VAE, in the original (ldm) VAE names
    clip_l.safetensors         CLIP-L, transformers' names (``text_model.*``)
    t5xxl_*.safetensors        the T5 encoder, transformers' names
    tokenizer_2/               T5's tokenizer (``tokenizer.json``, or ``spiece.model`` with
                               ``sentencepiece``), or a ``tokenizer.json`` in the folder itself

The architecture of each part is read off its tensors (T5's heads from its relative-attention
table). ``convert --to original`` writes a Flux base model back as such a folder, bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..families.flux.base import FluxBase
from ..families.flux.schedule import FLUX_SCHEDULE
from ..families.sd.configs import Family
from ..text.tokenizer import clip_tokenizer
from .build import numbered, shape_of
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, open_tensors, save_safetensors
from .dit_base import SPECS, TIED, build_part, fill_part, t5_tokenizer
from .flux_bfl import bfl_prefix, bfl_rule, bfl_transformer_config
from .infer import clip_config, vae_config_original_names
from .keymap import load_into, to_file
from .ldm import vae_rule

__all__ = ["is_flux_files", "load_flux_files", "save_flux_files", "t5_config"]

#: Flux.1's VAE: its latents' scale and shift (diffusers' config of FLUX.1-dev)
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
NAMES = {
    "transformer": "flux1.safetensors",
    "vae": "ae.safetensors",
    "text_encoder": "clip_l.safetensors",
    "text_encoder_2": "t5xxl.safetensors",
}


def _kind(tf: TensorFile) -> str | None:
    if bfl_prefix(tf) is not None:
        return "transformer"
    if "encoder.conv_in.weight" in tf and "decoder.conv_out.weight" in tf:
        return "vae"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in tf:
        return "text_encoder_2"
    if any(k.startswith(("text_model.encoder.layers.0.", "encoder.layers.0.self_attn")) for k in tf):
        return "text_encoder"
    return None


def _parts(folder: Path) -> dict[str, TensorFile]:
    found: dict[str, TensorFile] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tf = open_tensors(path)
        kind = _kind(tf)
        if kind is None:
            continue
        if kind in found:
            raise CheckpointError(
                f"{folder}: two {kind} files ({found[kind].path.name}, {path.name}); keep one"
            )
        found[kind] = tf
    return found


def is_flux_files(folder: Path) -> bool:
    """A folder holding a Flux.1 transformer in BFL's layout."""
    return folder.is_dir() and any(
        bfl_prefix(open_tensors(p)) is not None for p in folder.glob("*.safetensors")
    )


def t5_config(tf: TensorFile) -> dict[str, Any]:
    def shape(key: str) -> tuple[int, ...]:
        return shape_of(tf.shapes, key, str(tf.path))

    vocab, width = shape("shared.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in tf
    ff = shape(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
    layers = len(numbered(tf.shapes, r"encoder\.block\.(\d+)\..*"))
    return {
        "vocab_size": vocab,
        "d_model": width,
        "d_kv": inner // heads,
        "d_ff": ff,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def _tokenizer(folder: Path) -> Any:
    if (folder / "tokenizer_2").is_dir():
        return t5_tokenizer(folder / "tokenizer_2")
    if (folder / "tokenizer.json").is_file():
        return t5_tokenizer(folder)
    raise CheckpointError(
        f"{folder}: no T5 tokenizer: put T5's tokenizer.json (or its tokenizer_2/ folder) beside the "
        "model files"
    )


def load_flux_files(folder: Path, *, dtype: torch.dtype | None = None) -> FluxBase:
    parts = _parts(folder)
    missing = [f"{k} (like {NAMES[k]})" for k in NAMES if k not in parts]
    if missing:
        raise CheckpointError(f"{folder}: a Flux.1 model needs its {', '.join(missing)}")
    where = str(folder)
    tf = parts["transformer"]
    prefix = bfl_prefix(tf) or ""
    config = bfl_transformer_config(tf, prefix)
    spec = SPECS["flux"]
    transformer = build_part(spec, "transformer", config, where)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    present = [k for k in tf if k.startswith(prefix)] if prefix else list(tf)
    transformer = load_into(
        transformer,
        tf,
        lambda ks: [bfl_rule(k, inner, prefix) for k in ks],
        present=present,
        what="transformer",
        dtype=dtype,
    )
    ae = parts["vae"]
    vae_cfg = vae_config_original_names(ae.shapes, "", Family.SD1, str(ae.path))
    vae_cfg.update(
        FLUX_VAE, use_quant_conv="quant_conv.weight" in ae, use_post_quant_conv="post_quant_conv.weight" in ae
    )
    vae = build_part(spec, "vae", vae_cfg, str(ae.path))
    vae = load_into(
        vae, ae, lambda ks: [vae_rule(k, vae_cfg, "") for k in ks], present=list(ae), what="vae", dtype=dtype
    )
    clip = parts["text_encoder"]
    clip_cfg = clip_config(clip.shapes, "", Family.SD1, str(clip.path))
    clip_module = build_part(spec, "text_encoder", clip_cfg, str(clip.path))
    text_encoder = fill_part(spec, "text_encoder", clip_module, clip, "", dtype)
    t5 = parts["text_encoder_2"]
    text_encoder_2 = fill_part(
        spec,
        "text_encoder_2",
        build_part(spec, "text_encoder_2", t5_config(t5), str(t5.path)),
        t5,
        "",
        dtype,
    )
    return FluxBase(
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        clip_tokenizer(Family.SD1),
        _tokenizer(folder),
        schedule=dict(FLUX_SCHEDULE),
    )


def save_flux_files(base: FluxBase, folder: Path, *, overwrite: bool = False) -> list[Path]:
    """The model as BFL's separate files in ``folder`` (with T5's tokenizer.json)."""
    inner = base.transformer.config.num_attention_heads * base.transformer.config.attention_head_dim
    t_state = base.transformer.state_dict()
    transformer = to_file(t_state, [bfl_rule(k, inner) for k in t_state])
    v_state = base.vae.state_dict()
    vae = to_file(v_state, [vae_rule(k, dict(base.vae.config), "") for k in v_state])
    te = base.text_encoder
    canonical = "" if hasattr(te, "text_model") else "text_model."
    clip = {canonical + k: v for k, v in te.state_dict().items()}
    t5 = {k: v for k, v in base.text_encoder_2.state_dict().items() if k != TIED[0]}
    with atomic_outputs(folder, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        for part, tensors in (
            ("transformer", transformer),
            ("vae", vae),
            ("text_encoder", clip),
            ("text_encoder_2", t5),
        ):
            save_safetensors(tensors, tmp / NAMES[part], {"format": "pt"})
        (tmp / "tokenizer.json").write_text(base.tokenizer_2.backend_tokenizer.to_str())
    return [folder]
