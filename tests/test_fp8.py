"""FP8 weights and products (model/fp8.py): a layer computes what its dequantised weight and
quantised input compute (a modulation layer: its input unquantised), keeps its float8 bytes
through dtype moves, and a Flux generation with them stays close to the bf16 one; families without
an FP8 path refuse it in one line."""

from __future__ import annotations

import torch

from controlnet.families.flux import FluxControlNetConfig
from controlnet.model.fp8 import E4M3, FP8Linear
from tiny_flux import controlnet, tiny_flux_base


def test_an_fp8_layer_computes_its_quantised_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = FP8Linear(linear)
    x = torch.randn(3, 5, 64)
    rows = x.reshape(-1, 64)
    scale = rows.abs().amax(-1, keepdim=True) / 448
    xq = (rows / scale).to(E4M3).float() * scale
    want = (xq @ layer.weight.t() + linear.bias).reshape(3, 5, 32)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert (layer.weight - linear.weight).abs().max() <= linear.weight.abs().max() / 16  # e4m3: 3 bits
    bytes_before = layer.weight_bits.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_bits.dtype == torch.uint8 and torch.equal(layer.weight_bits, bytes_before)
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_a_weight_only_fp8_layer_takes_its_product_with_the_input_unquantised():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = FP8Linear(linear, weight_only=True)
    x = torch.randn(1, 64)  # a modulation layer's one vector per sample
    want = x @ layer.weight.t() + linear.bias  # the dequantised weight, the input as it is
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    quantised = FP8Linear(linear)(x)  # the FP8 product rounds the input too: further off
    assert (quantised - want).abs().max() > 10 * (layer(x) - want).abs().max()
    assert layer.weight_bits.dtype == torch.uint8 and "weight only" in repr(layer)


def test_flux_with_fp8_blocks_stays_close_to_full_precision():
    from controlnet.generation.denoiser import ControlUnit
    from controlnet.generation.sampling import denoise

    base = tiny_flux_base()
    cn = controlnet(base, FluxControlNetConfig(1, 1), seed=3)
    from controlnet.families.protocol import PromptEmbeddings

    cond, _ = base.encode_prompts(["a red square"], None)
    cond = PromptEmbeddings(cond.context, {**cond.added, "guidance": torch.full((1,), 3.5)})
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def run():
        return denoise(
            base,
            cond,
            None,
            [ControlUnit(cn, hint, 1.0)],
            sampler="euler",
            timestep_spacing="default",
            steps=3,
            guidance=1.0,
            eta=0.0,
            seeds=[7],
            latent_size=base.latent_size((64, 64)),
            progress=False,
        ).latents

    full = run()
    base.use_fp8([cn])
    n = sum(type(m) is FP8Linear for m in [*base.transformer.modules(), *cn.modules()])
    blocks = [*base.transformer.transformer_blocks, *base.transformer.single_transformer_blocks]
    layers = {name: m for block in blocks for name, m in block.named_modules()}
    assert n > 0 and not any(type(m) is torch.nn.Linear for m in layers.values())  # all stored in FP8
    # the modulation layers (one vector per sample) take their products in bf16, the rest in FP8
    assert (
        {name for name, m in layers.items() if getattr(m, "weight_only", False)}
        == {name for name in layers if name.startswith("norm") and name.endswith(".linear")}
        != set()
    )
    base.use_fp8([cn])  # idempotent
    assert sum(type(m) is FP8Linear for m in [*base.transformer.modules(), *cn.modules()]) == n
    fp8 = run()
    rel = float((fp8 - full).norm() / full.norm())
    assert 0 < rel < 0.1, rel


def test_a_unet_family_refuses_fp8_in_one_line(tmp_path, capsys):
    from controlnet.cli import main

    rc = main(["generate", "--fp8", "--steps", "1", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "fp8" in err and "transformer families" in err, err
    assert not list(tmp_path.glob("*.png"))
