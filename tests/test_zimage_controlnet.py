"""The Z-Image ControlNet (issue 34): our control blocks placed among the transformer's layers load
diffusers' ``ZImageControlNetModel`` state dict as is and give its residuals, for each way the
condition is refined before the main stage (its own plain blocks; its own control blocks steering
the ControlNet's pass through the image's noise refiner; the main control blocks doing so), with
captions of different lengths in one batch; the transformer's pass split where the ControlNet
reads it (prepare / finish) equals the transformer's own call with those residuals; a fresh
ControlNet copies its layers exactly and leaves the base's output unchanged; real sizes hold."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

from controlnet.families.zimage import ZImageControlNet, ZImageControlNetConfig
from controlnet.families.zimage.sequence import finish, patch_tokens, prepare

TRANSFORMER = {
    "in_channels": 4,
    "dim": 32,
    "n_layers": 4,
    "n_refiner_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 12,
    "axes_dims": [4, 6, 6],
    "axes_lens": [256, 64, 64],
}
CONFIGS = {
    "plain-refiner": ZImageControlNetConfig((0, 2), None, 6, None),
    "control-refiner": ZImageControlNetConfig((0, 2), (0, 1), 6, "control_noise_refiner"),
    "control-layers": ZImageControlNetConfig((0, 1, 3), (0,), 4, "control_layers"),
}


@pytest.fixture(scope="module")
def transformer() -> ZImageTransformer2DModel:
    torch.manual_seed(0)
    return ZImageTransformer2DModel(**TRANSFORMER).eval()


def theirs(transformer: ZImageTransformer2DModel, config: ZImageControlNetConfig) -> ZImageControlNetModel:
    t = transformer.config
    torch.manual_seed(1)
    model = ZImageControlNetModel(
        control_layers_places=list(config.control_layers_places),
        control_refiner_layers_places=list(config.control_refiner_layers_places or []),
        control_in_dim=config.control_in_dim,
        add_control_noise_refiner=config.refiner,
        dim=t.dim,
        n_refiner_layers=t.n_refiner_layers,
        n_heads=t.n_heads,
        n_kv_heads=t.n_kv_heads,
    ).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # open the zero projections, so that every part shows in the residuals
        for name, p in model.named_parameters():
            if "_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ZImageControlNetModel.from_transformer(model, transformer)


def inputs(batch: int = 2, control_in: int = 6):
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(4, 1, 12, 10, generator=g) for _ in range(batch)]  # 30 tokens: padded to 32
    captions = [torch.randn(n, 12, generator=g) for n in (7, 40)[:batch]]  # of different lengths
    control = [torch.randn(control_in, 1, 12, 10, generator=g) for _ in range(batch)]
    return latents, torch.tensor([0.3, 0.8][:batch]), captions, control


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_residuals_equal_diffusers_on_its_own_state_dict(transformer, name):
    config = CONFIGS[name]
    peer = theirs(transformer, config)
    ours = ZImageControlNet(dict(transformer.config), config).eval()
    own = {k: v for k, v in peer.state_dict().items() if k.startswith("control_")}
    ours.load_state_dict(own)  # strict: the same keys and shapes
    latents, t, captions, control = inputs(control_in=config.control_in_dim)
    with torch.no_grad():  # the strength also scales what the refiner blocks give the image's refiner
        want = peer(latents, t, captions, control, conditioning_scale=0.7)
        s, _ = prepare(transformer, latents, t, captions)
        got = ours(s, patch_tokens(transformer, control), 0.7)
    assert list(got) == list(want) == list(config.control_layers_places)
    for k in want:
        torch.testing.assert_close(got[k] * 0.7, want[k], rtol=1e-5, atol=1e-5)
        assert want[k].abs().amax() > 0


def test_the_split_pass_equals_the_transformer_with_the_residuals(transformer):
    peer = theirs(transformer, CONFIGS["control-refiner"])
    latents, t, captions, control = inputs()
    with torch.no_grad():
        residuals = peer(latents, t, captions, control)
        want = transformer(latents, t, captions, controlnet_block_samples=residuals).sample
        s, sizes = prepare(transformer, latents, t, captions)
        got = finish(s, sizes, residuals)
        plain = finish(s, sizes)
    for a, b, c in zip(got, want, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, c)  # the residuals changed something


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_fresh_controlnet_copies_its_layers_and_leaves_the_base_unchanged(transformer, name):
    config = CONFIGS[name]
    cn = ZImageControlNet.from_transformer(transformer, config)
    for place, block in zip(config.control_layers_places, cn.control_layers):
        theirs_ = transformer.layers[place].state_dict()
        assert all(torch.equal(block.state_dict()[k], v) for k, v in theirs_.items())
        assert not block.after_proj.weight.any() and (place != 0 or not block.before_proj.weight.any())
    latents, t, captions, control = inputs(control_in=config.control_in_dim)
    with torch.no_grad():
        s, sizes = prepare(transformer, latents, t, captions)
        residuals = cn(s, patch_tokens(transformer, control))
        assert all(not r.any() for r in residuals.values())
        with_cn = finish(s, sizes, residuals)
        without = transformer(latents, t, captions).sample
    assert all(torch.equal(a, b) for a, b in zip(with_cn, without))


def test_real_sizes_on_the_meta_device():
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()
        config = ZImageControlNetConfig(tuple(range(0, 30, 2)), (0, 1), 33, "control_noise_refiner")
        cn = ZImageControlNet(dict(transformer.config), config)
        peer = ZImageControlNetModel(
            control_layers_places=list(range(0, 30, 2)),
            control_refiner_layers_places=[0, 1],
            control_in_dim=33,
            add_control_noise_refiner="control_noise_refiner",
        )
    assert sum(p.numel() for p in transformer.parameters()) == 6_154_908_736
    shapes = {k: v.shape for k, v in cn.state_dict().items()}
    assert shapes == {k: v.shape for k, v in peer.state_dict().items()}
    assert sum(v.numel() for v in cn.state_dict().values()) == sum(p.numel() for p in peer.parameters())
