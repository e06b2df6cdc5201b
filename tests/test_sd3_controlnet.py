"""The SD3 / SD3.5 ControlNet (our controlled copy of the first joint blocks): a fresh one leaves
the base bit for bit, the published layouts load key for key and compute what diffusers'
SD3ControlNetModel computes (SD3's, with its own patch embedding and text; SD3.5 Large's, on the
base's tokens and without text; an inpainting one with an extra channel), and real sizes."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel

from controlnet.families.sd3 import SD3ControlNet, SD3ControlNetConfig

TINY = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 10,
    "out_channels": 4,
    "pos_embed_max_size": 16,
}


def transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY).eval()


def inputs(seed: int = 1, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "pooled_projections": torch.randn(batch, 10, generator=g),
        "timestep": torch.tensor([500.0] * batch),
    }


def opened(cn: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cn.eval()


def test_a_fresh_controlnet_leaves_the_base_bit_for_bit():
    base = transformer()
    cn = SD3ControlNet.from_transformer(base, SD3ControlNetConfig(num_layers=2))
    x = inputs()
    cond = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        res = cn(x["hidden_states"], cond, **{k: v for k, v in x.items() if k != "hidden_states"})
        assert all(not r.any() for r in res)
        plain = base(**x).sample
        assert torch.equal(base(**x, block_controlnet_hidden_states=res).sample, plain)
        state = base.state_dict()
        assert all(
            torch.equal(v, state[k])
            for k, v in cn.state_dict().items()
            if k in state and "controlnet" not in k
        )
        opened(cn)
        res = cn(x["hidden_states"], cond, **{k: v for k, v in x.items() if k != "hidden_states"})
        assert not torch.equal(base(**x, block_controlnet_hidden_states=res).sample, plain)


VARIANTS = {
    "sd3": (SD3ControlNetConfig(num_layers=2), {}),
    "sd3.5-large": (
        SD3ControlNetConfig(num_layers=2, own_pos_embed=False, reads_text=False, zero_pooled=False),
        {"use_pos_embed": False, "joint_attention_dim": None, "force_zeros_for_pooled_projection": False},
    ),
    "inpainting": (
        SD3ControlNetConfig(num_layers=3, extra_conditioning_channels=1),
        {"extra_conditioning_channels": 1},
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_diffusers_sd3_controlnet_key_for_key(variant):
    config, peer_config = VARIANTS[variant]
    base = transformer()
    cn = opened(SD3ControlNet(dict(base.config), config))
    fields = {k: v for k, v in TINY.items() if k != "num_layers"}
    peer = SD3ControlNetModel(**{**fields, "num_layers": config.num_layers, **peer_config}).eval()
    peer.load_state_dict(cn.state_dict())  # strict: the published layout, as is
    x = inputs()
    cond = torch.randn(
        2, 4 + config.extra_conditioning_channels, 8, 8, generator=torch.Generator().manual_seed(9)
    )
    hidden = x["hidden_states"] if config.own_pos_embed else base.pos_embed(x["hidden_states"])
    text = x["encoder_hidden_states"] if config.reads_text else None
    pooled = x["pooled_projections"]
    with torch.no_grad():
        ours = cn(
            hidden,
            cond,
            pooled_projections=pooled,
            timestep=x["timestep"],
            encoder_hidden_states=text,
            scale=0.6,
        )
        theirs = peer(
            hidden_states=hidden,
            controlnet_cond=cond,
            conditioning_scale=0.6,
            pooled_projections=torch.zeros_like(pooled) if config.zero_pooled else pooled,
            encoder_hidden_states=text,
            timestep=x["timestep"],
            return_dict=False,
        )[0]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


#: SD3-medium's transformer config (its published config.json)
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}


def test_real_sizes_on_the_meta_device():
    """SD3-medium's transformer and a 12-block ControlNet for it."""
    with torch.device("meta"):
        base = SD3Transformer2DModel(**SD3_MEDIUM)
    assert sum(p.numel() for p in base.parameters()) == 2_028_328_000
    cn = SD3ControlNet(dict(base.config), SD3ControlNetConfig(num_layers=12), device="meta")
    assert sum(p.numel() for p in cn.parameters()) == 1_062_855_168
