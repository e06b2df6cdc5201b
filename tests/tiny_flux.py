"""A tiny Flux.1 world for tests: base model parts of a few channels, a T5-shaped tokenizer,
ControlNets with their zero layers opened."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from controlnet.families.flux import FluxControlNet, FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.families.sd.configs import Family
from controlnet.text.tokenizer import clip_tokenizer

TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels, 2x2 patches
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 10,
    "guidance_embeds": True,
    "axes_dims_rope": [2, 2, 4],
}


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A small unigram vocabulary in T5's shape (pad 0, end 1, unk 2; an end token appended)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (c, -2.0) for c in "▁abcdefghijklmnopqrstuvwxyz"
    ]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


#: Flux.1's head (128 channels, rotary axes 16/56/56) once: what a file without a config implies
FLUX_HEAD = {"attention_head_dim": 128, "num_attention_heads": 1, "axes_dims_rope": [16, 56, 56]}


def tiny_flux_base(max_sequence_length: int = 16, seed: int = 0, *, config_less: bool = False) -> FluxBase:
    """A complete Flux.1-dev-shaped base model of a few channels (random weights). ``config_less``:
    sizes that files without a config can hold - Flux.1's 128-channel head with its rotary split,
    CLIP's 64-channel heads, a VAE of 32 norm groups with Flux.1's latent scale and shift."""
    torch.manual_seed(seed)
    ldm_vae = config_less
    extra = {**FLUX_HEAD, "pooled_projection_dim": 64} if config_less else {}
    transformer = FluxTransformer2DModel(**{**TRANSFORMER, **extra}).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32) if ldm_vae else (8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32 if ldm_vae else 4,
        scaling_factor=0.3611 if ldm_vae else 0.6,
        shift_factor=0.1159 if ldm_vae else 0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    # a posterior of no spread: diffusers draws the condition's latents from it, we take its mean
    with torch.no_grad():
        out = vae.encoder.conv_out
        out.weight[4:].zero_()
        out.bias[4:].fill_(-1000.0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64 if config_less else 10,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=1 if config_less else 2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(vocab_size=32, d_model=12, d_kv=4, d_ff=24, num_layers=2, num_heads=3)
    ).eval()
    base = FluxBase(
        transformer,
        vae,
        clip,
        t5,
        clip_tokenizer(Family.SD1),
        t5_tokenizer(),
        max_sequence_length=max_sequence_length,
    )
    return base


def controlnet(base: FluxBase, config: FluxControlNetConfig, seed: int) -> FluxControlNet:
    cn = FluxControlNet.from_transformer(base.transformer, config, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cn
