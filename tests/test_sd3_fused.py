"""SD3's fused blocks compute what diffusers' blocks compute: the whole transformer (SD3 without
query-key norms; SD3.5 with RMS query-key norms and dual-attention blocks; the last block's
text-only input), with ControlNet residuals, to float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock

from controlnet.families.sd3.fused import FusedJointTransformerBlock, fuse_blocks, stock_blocks
from test_sd3_controlnet import TINY, inputs

VARIANTS = {"sd3": {}, "sd3.5": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 2)}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_fused_transformer_equals_diffusers(variant):
    torch.manual_seed(0)
    stock = SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # norm weights away from one: a mix-up of the streams' norms would show
        for name, p in stock.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    fused = copy.deepcopy(stock)
    assert fuse_blocks(fused) == TINY["num_layers"]
    assert all(type(b) is FusedJointTransformerBlock for b in fused.transformer_blocks)
    x = inputs()
    residuals = [torch.randn(2, 16, 16, generator=g) for _ in range(2)]
    with torch.no_grad():
        for extra in ({}, {"block_controlnet_hidden_states": residuals}):
            want = stock(**x, **extra).sample
            got = fused(**x, **extra).sample
            assert want.abs().max() > 0.1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            with stock_blocks(fused):
                assert all(type(b) is JointTransformerBlock for b in fused.transformer_blocks)
                assert torch.equal(fused(**x, **extra).sample, want)  # diffusers' own forward again


def test_blocks_with_layer_norm_query_key_norms_keep_diffusers_forward():
    torch.manual_seed(0)
    net = SD3Transformer2DModel(**TINY, qk_norm="layer_norm").eval()
    assert fuse_blocks(net) == 0
