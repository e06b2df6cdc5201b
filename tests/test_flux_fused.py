"""Flux's fused blocks compute what diffusers' blocks compute: the whole transformer (double and
single blocks, with ControlNet residuals) to float32 rounding, and the ControlNet's copy too; blocks
with another attention processor keep diffusers' forward."""

from __future__ import annotations

import copy
import warnings

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformerBlock

from controlnet.families.flux import FluxControlNet, FluxControlNetConfig
from controlnet.families.flux.fused import (
    FusedFluxSingleTransformerBlock,
    FusedFluxTransformerBlock,
    fuse_blocks,
    stock_blocks,
)
from test_flux_controlnet import condition, inputs, open_zero_layers, tiny_transformer


def _randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights away from one (a mix-up of the streams' norms would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return net


def test_the_fused_transformer_equals_diffusers():
    stock = _randomised(tiny_transformer(), 3)
    fused = copy.deepcopy(stock)
    assert fuse_blocks(fused) == 3 + 4
    assert all(type(b) is FusedFluxTransformerBlock for b in fused.transformer_blocks)
    assert all(type(b) is FusedFluxSingleTransformerBlock for b in fused.single_transformer_blocks)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    x = inputs()
    g = torch.Generator().manual_seed(4)
    c = x["encoder_hidden_states"].shape[1]
    tokens = x["hidden_states"].shape[1]
    residuals = {
        "controlnet_block_samples": [torch.randn(2, tokens, 16, generator=g) for _ in range(3)],
        "controlnet_single_block_samples": [torch.randn(2, tokens, 16, generator=g) for _ in range(2)],
    }
    with torch.no_grad():
        for extra in ({}, residuals):
            want = stock(**x, **extra).sample
            got = fused(**x, **extra).sample
            assert want.abs().max() > 0.1 and c > 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_fused_controlnet_equals_the_stock_one():
    """Our ControlNet is built with the fused blocks; with diffusers' own blocks it computes the same."""
    base = _randomised(tiny_transformer(), 5)
    fused = FluxControlNet.from_transformer(base, FluxControlNetConfig(2, 3, num_mode=4)).eval()
    open_zero_layers(fused)
    kinds = (FusedFluxTransformerBlock, FusedFluxSingleTransformerBlock)
    assert sum(isinstance(m, kinds) for m in fused.modules()) == 5
    with torch.no_grad():
        got = fused(condition=condition(), mode=2, **inputs())
        with stock_blocks(fused):  # diffusers' own blocks, for the time being
            assert not any(isinstance(m, kinds) for m in fused.modules())
            want = fused(condition=condition(), mode=2, **inputs())
    assert sum(isinstance(m, kinds) for m in fused.modules()) == 5
    for a, b in zip([*got.double, *got.single], [*want.double, *want.single], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_blocks_with_another_attention_processor_keep_diffusers_forward():
    net = tiny_transformer()

    class Other(FluxAttnProcessor):
        pass

    net.transformer_blocks[0].attn.set_processor(Other())
    assert fuse_blocks(net) == 3 + 4 - 1
    assert type(net.transformer_blocks[0]) is FluxTransformerBlock


def test_the_fused_groups_compile_once_and_run_plain_under_a_flop_counter(monkeypatch):
    """Where the groups run compiled (a GPU; here the CPU, to test it), a first call under a
    dispatch mode (the benchmarks' FLOP counter, which torch.compile cannot run under) runs the
    plain code and leaves them to compile on the next call; they give the plain result."""
    from torch.utils.flop_counter import FlopCounterMode

    from controlnet.model import fused

    monkeypatch.setattr(fused, "COMPILED_ON", {"cpu"})
    monkeypatch.setattr(fused, "_COMPILED", {})
    g = torch.Generator().manual_seed(0)
    x, shift, scale = (
        torch.randn(2, 6, 8, generator=g),
        torch.randn(2, 8, generator=g),
        torch.randn(2, 8, generator=g),
    )
    with FlopCounterMode(display=False):
        counted = fused.modulate(x, shift, scale, 1e-6)
    assert fused.kernel_state() == {}  # nothing compiled, nothing given up
    got = fused.modulate(x, shift, scale, 1e-6)
    assert fused.kernel_state() == {"modulate": "compiled"}
    want = torch.nn.functional.layer_norm(x, (8,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(counted, want)


def test_residuals_given_to_the_blocks_equal_diffusers_adding_them_after_each_block(monkeypatch):
    """A fused block adds the ControlNet residual it is given in its last sum (one kernel); the
    transformer then equals diffusers' adding ``controlnet_*block_samples`` after each block - also
    where the fused blocks run diffusers' forward (given attention arguments) and add it after."""
    from controlnet.model import fused as groups

    stock = _randomised(tiny_transformer(), 6)
    net = copy.deepcopy(stock)
    fuse_blocks(net)
    x = inputs()
    g = torch.Generator().manual_seed(8)
    tokens = x["hidden_states"].shape[1]
    double = [torch.randn(2, tokens, 16, generator=g) for _ in range(2)]  # over 3 blocks: 0, 0, 1
    single = [torch.randn(2, tokens, 16, generator=g) for _ in range(4)]
    blocks = [*net.transformer_blocks, *net.single_transformer_blocks]
    assert groups.takes_residuals(blocks) and not groups.takes_residuals(stock.transformer_blocks)
    spread = [double[0], double[0], double[1], *single]
    sums = []
    real = groups.gated_add_residual
    monkeypatch.setattr(groups, "gated_add_residual", lambda *a: sums.append(1) or real(*a))
    with torch.no_grad():
        want = stock(**x, controlnet_block_samples=double, controlnet_single_block_samples=single).sample
        with groups.adding_residuals(blocks, spread):
            got = net(**x).sample
        assert len(sums) == 7  # each block's last sum took its residual
        assert all(groups.block_residual(b) is None for b in blocks)  # given for the block only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with groups.adding_residuals(blocks, spread), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (diffusers: "unused ... will be ignored")
            got = net(**x, joint_attention_kwargs={"unused": 1}).sample
        assert len(sums) == 7  # diffusers' forward in each block, the residual added after it
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_each_fused_block_compiles_whole_as_one_graph():
    """``--fast`` compiles each block whole: a graph break inside one (as a dispatch-mode check in
    the query/key preparation once made) splits it into pieces and costs the fusion it is for."""
    net = _randomised(tiny_transformer(), 5)
    fuse_blocks(net)
    blocks = (net.transformer_blocks[0], net.single_transformer_blocks[0])
    seen = {}
    hooks = [
        b.register_forward_pre_hook(lambda m, a, kw: seen.setdefault(type(m), (a, kw)), with_kwargs=True)
        for b in blocks
    ]
    with torch.no_grad():
        net(**inputs())
        for h in hooks:
            h.remove()
        for block in blocks:
            args, kwargs = seen[type(block)]
            torch._dynamo.reset()
            compiled = torch.compile(block, backend="eager", fullgraph=True)  # a break raises here
            for got, want in zip(compiled(*args, **kwargs), block(*args, **kwargs)):
                torch.testing.assert_close(got, want)
