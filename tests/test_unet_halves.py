"""The UNet's forward in two halves equals diffusers' forward bit for bit; run beside the
ControlNets (controlled_unet_forward(concurrent=True)) it gives the plain order's outputs."""

import pytest
import torch

from controlnet import Control, Family, control_scales, controlled_unet_forward
from controlnet.families.sd.halves import decoder_half, encoder_half
from tiny import cond_image, make_controlnet, make_unet, unet_inputs


def encoder_features(unet, inputs):
    return encoder_half(
        unet,
        inputs["sample"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        inputs.get("added_cond_kwargs"),
    )


def halves_forward(unet, inputs, residuals=None):
    return decoder_half(unet, encoder_features(unet, inputs), inputs["encoder_hidden_states"], residuals)


def random_residuals(unet, inputs, seed=5):
    """Residuals of the UNet's skip shapes (taken from the encoder half itself)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(f.shape, generator=g) for f in encoder_features(unet, inputs)[1:]]


@pytest.mark.parametrize("latent", [(8, 8), (10, 6)], ids=["multiple-of-8", "odd-size"])
def test_halves_equal_the_unet_forward(family, latent):
    unet = make_unet(family)
    inputs = unet_inputs(unet)
    g = torch.Generator().manual_seed(4)
    inputs["sample"] = torch.randn(2, 4, *latent, generator=g)
    with torch.no_grad():
        res = random_residuals(unet, inputs)
        assert torch.equal(halves_forward(unet, inputs), unet(**inputs).sample)
        expected = unet(
            **inputs,
            down_block_additional_residuals=tuple(res[:-1]),
            mid_block_additional_residual=res[-1],
        ).sample
        assert torch.equal(halves_forward(unet, inputs, res), expected)
        with pytest.raises(ValueError, match=f"expected {len(res)} residuals for this UNet, got 3"):
            halves_forward(unet, inputs, res[:3])


def test_concurrent_forward_equals_the_plain_order(family):
    """The concurrent path (UNet encoder half beside the ControlNets, then the decoder half; on a
    CPU the same calls in a loop) against the plain one (residuals into the UNet's forward), with
    two ControlNets, one of them on the conditional half of a CFG batch only."""
    unet = make_unet(family)
    cns = [make_controlnet(unet, open_zero=True, seed=10 + i) for i in range(2)]
    inputs = unet_inputs(unet, batch=2)
    n = cns[0].num_residuals
    hints = [cn.encode_hint(cond_image(batch=1, seed=20 + i)).detach() for i, cn in enumerate(cns)]
    controls = [
        Control(cns[0], hints[0], control_scales(n, 0.8)),
        Control(cns[1], hints[1], control_scales(n, 1.2, "controlnet"), conditional_only=True),
    ]
    x = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    added = inputs.get("added_cond_kwargs")
    with torch.no_grad():
        outs = [
            controlled_unet_forward(
                unet, *x, controls, cfg_batch=True, added_cond_kwargs=added, concurrent=concurrent
            )
            for concurrent in (False, True)
        ]
        # no active control: both paths are the plain forward
        off = [Control(cns[0], hints[0], control_scales(n, 0.0))]
        plain = [
            controlled_unet_forward(unet, *x, off, added_cond_kwargs=added, concurrent=concurrent)
            for concurrent in (False, True)
        ]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], plain[0])
    assert torch.equal(plain[0], plain[1])
    assert torch.equal(plain[0], unet(*x, added_cond_kwargs=added).sample)


def test_the_controlnet_copy_runs_the_unet_encoder():
    """A ControlNet freshly copied from the UNet, with a zero hint, computes the UNet's own encoder:
    its skips (before the zero convolutions) are the encoder half's."""
    unet = make_unet(Family.SD1)
    cn = make_controlnet(unet)
    for z in cn.controlnet_down_blocks:  # identity 1x1 convs in place of the zero convolutions
        with torch.no_grad():
            z.weight.copy_(torch.eye(z.weight.shape[0])[:, :, None, None])
            z.bias.zero_()
    with torch.no_grad():
        cn.controlnet_mid_block.weight.copy_(
            torch.eye(cn.controlnet_mid_block.weight.shape[0])[:, :, None, None]
        )
        cn.controlnet_mid_block.bias.zero_()
    inputs = unet_inputs(unet)
    x = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        hint = torch.zeros(1, unet.conv_in.out_channels, 8, 8)
        residuals = cn(*x, hint)
        features = encoder_half(unet, *x)
    assert len(residuals) == len(features) - 1
    for r, f in zip(residuals, features[1:]):
        torch.testing.assert_close(r, f, rtol=1e-5, atol=1e-6)
