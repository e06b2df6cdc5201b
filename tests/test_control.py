"""Injection: scales, strength, modes, only-mid, conditional half, several ControlNets."""

import pytest
import torch

from controlnet import (
    Control,
    ControlMode,
    Family,
    control_residuals,
    control_scales,
    controlled_unet_forward,
)
from controlnet.model.control import soft_scales
from tiny import cond_image, make_controlnet, make_unet, unet_inputs


def setup(family=Family.SD1, n=2):
    unet = make_unet(family)
    cns = [make_controlnet(unet, open_zero=True, seed=10 + i) for i in range(n)]
    inputs = unet_inputs(unet)
    hints = [cn.encode_hint(cond_image(seed=20 + i)).detach() for i, cn in enumerate(cns)]
    return unet, cns, inputs, hints


def fwd(unet, inputs, controls, **kw):
    with torch.no_grad():
        return controlled_unet_forward(
            unet,
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            controls,
            added_cond_kwargs=inputs.get("added_cond_kwargs"),
            **kw,
        )


def test_soft_scales_follow_the_formula():
    for s in (0.3, 1.0, 1.7):
        assert soft_scales(13, s) == [s * 0.825 ** float(12 - i) for i in range(13)]
        assert control_scales(13, s, "prompt") == soft_scales(13, s)
        assert control_scales(13, s, ControlMode.CONTROLNET) == soft_scales(13, s)
        assert control_scales(13, s) == [s] * 13
    xl = soft_scales(10)
    assert xl[-1] == 1.0 and xl[0] == pytest.approx(0.825**9)
    assert control_scales(13, 0.5, only_mid=True) == [0.0] * 12 + [0.5]


def test_strength_zero_gives_the_base_output(family):
    unet, cns, inputs, hints = setup(family, n=1)
    base = fwd(unet, inputs, [])
    ctl = Control(cns[0], hints[0], control_scales(cns[0].num_residuals, 0.0))
    assert torch.equal(fwd(unet, inputs, [ctl]), base)
    assert not torch.equal(fwd(unet, inputs, [Control(cns[0], hints[0], [1.0] * cns[0].num_residuals)]), base)


def test_a_region_keeps_the_residuals_to_it(family):
    """A region multiplies each residual by its share of every cell: all ones changes nothing, all
    zeros gives the base output, and a half region zeroes the residuals outside it (cells on the
    border get the share they cover)."""
    unet, cns, inputs, hints = setup(family, n=1)
    cn, hint = cns[0], hints[0]
    scales = [1.0] * cn.num_residuals
    h, w = inputs["sample"].shape[-2:]
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    kw = {"added_cond_kwargs": inputs.get("added_cond_kwargs")}
    with torch.no_grad():
        plain = control_residuals([Control(cn, hint, scales)], *args, **kw)
        ones = control_residuals([Control(cn, hint, scales, region=torch.ones(1, 1, h, w))], *args, **kw)
        left = torch.zeros(1, 1, h, w)
        left[..., : w // 2] = 1
        half = control_residuals([Control(cn, hint, scales, region=left)], *args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain, ones))
    for full, cut in zip(plain, half):
        cells = cut.shape[-1]
        if cells > 1:  # the grid splits at the region's edge
            assert torch.equal(cut[..., : cells // 2], full[..., : cells // 2])
            assert torch.equal(cut[..., cells // 2 :], torch.zeros_like(cut[..., cells // 2 :]))
        else:  # one cell: half of it is covered
            torch.testing.assert_close(cut, full * 0.5)
    assert torch.equal(
        fwd(unet, inputs, [Control(cn, hint, scales, region=torch.zeros(1, 1, h, w))]), fwd(unet, inputs, [])
    )


def test_strength_zero_does_not_run_the_controlnet():
    unet, cns, inputs, hints = setup(n=1)
    calls = []
    cns[0].register_forward_hook(lambda *a: calls.append(1))
    fwd(unet, inputs, [Control(cns[0], hints[0], [0.0] * 13)])
    assert calls == []


def test_two_controlnets_give_the_sum_of_their_residuals(family):
    unet, cns, inputs, hints = setup(family)
    x = {k: inputs[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    added = inputs.get("added_cond_kwargs")
    n = cns[0].num_residuals
    c1 = Control(cns[0], hints[0], control_scales(n, 0.7))
    c2 = Control(cns[1], hints[1], control_scales(n, 1.3, "prompt"))
    with torch.no_grad():
        r1 = control_residuals([c1], *x.values(), added_cond_kwargs=added)
        r2 = control_residuals([c2], *x.values(), added_cond_kwargs=added)
        both = control_residuals([c1, c2], *x.values(), added_cond_kwargs=added)
        # on parallel streams where there are any (on a CPU the same loop): the same sums, in order
        concurrent = control_residuals([c1, c2], *x.values(), added_cond_kwargs=added, concurrent=True)
        manual = unet(
            **inputs,
            down_block_additional_residuals=tuple(a + b for a, b in zip(r1[:-1], r2[:-1])),
            mid_block_additional_residual=r1[-1] + r2[-1],
        ).sample
    for a, b, s, c in zip(r1, r2, both, concurrent, strict=True):
        assert torch.equal(a + b, s)
        assert torch.equal(c, s)
    assert torch.equal(fwd(unet, inputs, [c1, c2]), manual)


def test_scales_multiply_each_residual():
    _unet, cns, inputs, hints = setup(n=1)
    x = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    scales = [0.1 * i for i in range(13)]
    with torch.no_grad():
        raw = cns[0](*x, hints[0])
        scaled = control_residuals([Control(cns[0], hints[0], scales)], *x)
    for r, s, out in zip(raw, scales, scaled):
        torch.testing.assert_close(out, r * s)


def test_only_mid_control_touches_only_the_middle_residual():
    unet, cns, inputs, hints = setup(n=1)
    x = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        raw = cns[0](*x, hints[0])
        res = control_residuals([Control(cns[0], hints[0], control_scales(13, 0.8, only_mid=True))], *x)
        expected = unet(
            *x,
            down_block_additional_residuals=tuple(torch.zeros_like(r) for r in raw[:-1]),
            mid_block_additional_residual=raw[-1] * 0.8,
        ).sample
    assert all(torch.count_nonzero(r) == 0 for r in res[:-1])
    torch.testing.assert_close(res[-1], raw[-1] * 0.8)
    assert torch.equal(
        fwd(unet, inputs, [Control(cns[0], hints[0], control_scales(13, 0.8, only_mid=True))]), expected
    )


def test_conditional_only_leaves_the_unconditional_half_alone(family):
    unet, cns, inputs, hints = setup(family, n=1)
    calls = []
    cns[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    n = cns[0].num_residuals
    cfg_inputs = {
        k: (torch.cat([v, v]) if torch.is_tensor(v) else {kk: torch.cat([vv, vv]) for kk, vv in v.items()})
        for k, v in inputs.items()
    }
    base = fwd(unet, cfg_inputs, [])
    both = fwd(
        unet, cfg_inputs, [Control(cns[0], torch.cat([hints[0]] * 2), control_scales(n, 1.0))], cfg_batch=True
    )
    cond_only = fwd(
        unet,
        cfg_inputs,
        [Control(cns[0], hints[0], control_scales(n, 1.0), conditional_only=True)],
        cfg_batch=True,
    )
    b = inputs["sample"].shape[0]
    assert calls == [2 * b, b]  # the conditional-only run saw half the batch
    assert torch.equal(cond_only[:b], base[:b])
    torch.testing.assert_close(cond_only[b:], both[b:], rtol=1e-5, atol=1e-6)


def test_bad_control_arguments():
    _unet, cns, _, hints = setup(n=1)
    with pytest.raises(ValueError, match="12 control scales for a ControlNet with 13 residuals"):
        Control(cns[0], hints[0], [1.0] * 12)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        control_scales(13, -1.0)
    with pytest.raises(ValueError, match="unknown control mode 'loud'"):
        control_scales(13, 1.0, "loud")


def test_a_float32_controlnet_controls_a_bfloat16_unet(family):
    """While a ControlNet trains (float32) beside a locked bfloat16 UNet, validation samples run
    the pair outside autocast: the ControlNet takes its own dtype, its residuals the UNet's."""
    unet, cns, inputs, hints = setup(family, n=1)
    ctl = Control(cns[0], hints[0], [1.0] * cns[0].num_residuals)
    full = fwd(unet, inputs, [ctl])
    unet_bf16 = unet.to(torch.bfloat16)
    low = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    if "added_cond_kwargs" in inputs:
        low["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in inputs["added_cond_kwargs"].items()}
    out = fwd(unet_bf16, low, [ctl])
    assert out.dtype == torch.bfloat16
    assert cns[0].dtype == torch.float32
    assert torch.allclose(out.float(), full, atol=0.1, rtol=0.05)
