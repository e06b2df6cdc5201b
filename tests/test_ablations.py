"""The paper's comparison variants: Gaussian connections, ControlNet-lite, condition concat."""

import torch

from circles import Circles
from controlnet import Control, ControlledUNet, ControlNet, Family, control_scales, controlled_unet_forward
from controlnet.families.sd.configs import unet_config
from controlnet.training.ablations import ConcatObjective, ConcatUNet, LiteControlNet, gaussian_connections
from controlnet.training.objectives import ControlNetObjective
from controlnet.training.train import train
from test_train import config
from tiny import cond_image, make_base, make_controlnet, unet_inputs


def test_gaussian_connections_break_the_zero_init_identity():
    base = make_base()
    cn = gaussian_connections(make_controlnet(base.unet))
    assert all(z.weight.abs().sum() > 0 for z in cn.zero_convs())
    x = unet_inputs(base.unet)
    with torch.no_grad():
        out = ControlledUNet(base.unet, cn)(
            x["sample"], x["timestep"], x["encoder_hidden_states"], cond_image()
        )
        assert not torch.allclose(out, base.unet(**x).sample)


def test_lite_has_the_controlnet_interface_and_identity_at_init(family):
    base_unet = make_base(family).unet if family is not Family.SDXL else None
    if base_unet is None:
        return  # the lite variant ignores SDXL's added embeddings; it is compared on SD1-style models
    lite = LiteControlNet(base_unet)
    full = make_controlnet(base_unet)
    x = unet_inputs(base_unet)
    hint = lite.encode_hint(cond_image())
    with torch.no_grad():
        shapes = [r.shape for r in lite(**x, hint=hint)]
        assert shapes == [r.shape for r in full(**x, hint=full.encode_hint(cond_image()))]
        ctl = Control(lite, hint, control_scales(lite.num_residuals, 1.0))
        y = controlled_unet_forward(base_unet, x["sample"], x["timestep"], x["encoder_hidden_states"], [ctl])
        assert torch.equal(y, base_unet(**x).sample)


def test_lite_in_float32_takes_bfloat16_inputs_like_controlnet():
    # in training a float32 copy runs next to a bfloat16 UNet: its inputs come in bfloat16
    base = make_base()
    x = unet_inputs(base.unet)
    for cn in (LiteControlNet(base.unet), make_controlnet(base.unet)):
        hint = cn.encode_hint(cond_image()).bfloat16()
        with torch.no_grad():
            out = cn(x["sample"].bfloat16(), x["timestep"], x["encoder_hidden_states"].bfloat16(), hint=hint)
        assert all(r.dtype == torch.float32 for r in out)


def test_lite_is_far_smaller_than_controlnet_at_real_size():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(Family.SD1))
        lite = LiteControlNet(unet)
    full = ControlNet.from_unet(unet)
    n_lite, n_full = (sum(p.numel() for p in m.parameters()) for m in (lite, full))
    assert n_lite < 0.2 * n_full


def test_concat_unet_starts_as_the_base_and_trains_the_whole_unet(tmp_path):
    base = make_base()
    x = unet_inputs(base.unet)
    model = ConcatUNet(base.unet)
    model.cond = cond_image()
    with torch.no_grad():
        torch.testing.assert_close(model(**x).sample, base.unet(**x).sample, rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    obj = ConcatObjective(base)
    train(config(tmp_path, steps=2, lr=1e-3), obj, Circles(8))
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())  # the copy trains
    assert not torch.equal(
        obj.model.unet.conv_in.weight[:, 4:], torch.zeros_like(obj.model.unet.conv_in.weight[:, 4:])
    )


def test_lite_and_gaussian_train_through_the_controlnet_objective(tmp_path):
    for name, make in {
        "lite": lambda u: LiteControlNet(u),
        "gauss": lambda u: gaussian_connections(make_controlnet(u)),
    }.items():
        base = make_base()
        cn = make(base.unet)
        before = {k: v.clone() for k, v in cn.state_dict().items()}
        train(config(tmp_path, name, steps=2, lr=1e-3), ControlNetObjective(base, cn), Circles(8))
        assert any(not torch.equal(v, cn.state_dict()[k]) for k, v in before.items())
