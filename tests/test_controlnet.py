"""ControlNet for the three UNet families: copies, zero init, gradients, residual shapes."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from controlnet import ControlledUNet, ControlNet, ControlNetConfig, Family, unet_config
from tiny import cond_image, make_controlnet, make_unet, unet_inputs

NEW_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
EXPECTED_RESIDUALS = {Family.SD1: 13, Family.SD2: 13, Family.SDXL: 10}


def test_zero_init_identity_is_bitwise(family):
    unet = make_unet(family)
    model = ControlledUNet(unet, make_controlnet(unet))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(**inputs).sample
        for seed in range(3):  # any condition image
            out = model(
                **{k: v for k, v in inputs.items() if k != "added_cond_kwargs"},
                cond=cond_image(seed=seed) * 10 - 5,
                added_cond_kwargs=inputs.get("added_cond_kwargs"),
            )
            assert torch.equal(out, base)


def test_every_copied_tensor_equals_its_source(family):
    unet = make_unet(family)
    cn = make_controlnet(unet)
    src = unet.state_dict()
    copied = new = 0
    for name, t in cn.state_dict().items():
        if name.startswith(NEW_PREFIXES):
            new += 1
            continue
        assert name in src, f"{name} has no twin in the UNet"
        assert torch.equal(t, src[name]), name
        assert t.data_ptr() != src[name].data_ptr()
        copied += 1
    # every encoder-side tensor of the UNet was copied
    encoder = [
        k
        for k in src
        if k.startswith(("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block."))
    ]
    assert copied == len(encoder)
    assert cn.num_residuals == EXPECTED_RESIDUALS[family]
    assert len(cn.zero_convs()) == cn.num_residuals + 1
    for z in cn.zero_convs():
        assert all(torch.count_nonzero(p) == 0 for p in z.parameters())
    hint_params = [k for k in cn.state_dict() if k.startswith(NEW_PREFIXES[0])]
    assert len(hint_params) == 2 * 8  # 8 convs, weight and bias each


def test_first_backward_and_optimiser_step(family):
    unet = make_unet(family)
    cn = make_controlnet(unet).train()
    model = ControlledUNet(unet, cn)
    inputs = unet_inputs(unet)
    added = inputs.pop("added_cond_kwargs", None)
    locked = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        base = unet(**inputs, added_cond_kwargs=added).sample
    cond = cond_image()
    model(**inputs, cond=cond, added_cond_kwargs=added).square().mean().backward()

    zero_out = [*cn.controlnet_down_blocks, cn.controlnet_mid_block]
    for z in zero_out:
        assert z.weight.grad is not None and z.weight.grad.abs().sum() > 0
    behind = {id(p) for z in zero_out for p in z.parameters()}
    for name, p in cn.named_parameters():
        if id(p) not in behind:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert all(p.grad is None for p in unet.parameters())

    torch.optim.AdamW(cn.parameters(), lr=1e-3).step()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, locked[k]), k
    with torch.no_grad():
        assert not torch.equal(model(**inputs, cond=cond, added_cond_kwargs=added), base)


def test_locked_encoder_builds_no_autograd_state(family):
    unet = make_unet(family)
    model = ControlledUNet(unet, make_controlnet(unet, open_zero=True).train())
    seen: dict[str, bool] = {}

    def hook(name):
        def fn(_module, _args, out):
            t = out[0] if isinstance(out, tuple) else out
            seen[name] = t.requires_grad

        return fn

    handles = [b.register_forward_hook(hook(f"down{i}")) for i, b in enumerate(unet.down_blocks)]
    handles += [b.register_forward_hook(hook(f"up{i}")) for i, b in enumerate(unet.up_blocks)]
    inputs = unet_inputs(unet)
    added = inputs.pop("added_cond_kwargs", None)
    out = model(**inputs, cond=cond_image(), added_cond_kwargs=added)
    for h in handles:
        h.remove()
    assert out.requires_grad
    assert not any(v for k, v in seen.items() if k.startswith("down")), seen
    assert all(v for k, v in seen.items() if k.startswith("up")), seen


def test_residual_shapes_match_the_unet_skips(family):
    unet = make_unet(family)
    cn = make_controlnet(unet)
    skips: list[torch.Size] = []
    unet.conv_in.register_forward_hook(lambda m, a, o: skips.append(o.shape))
    for b in unet.down_blocks:
        b.register_forward_hook(lambda m, a, o: skips.extend(s.shape for s in o[1]))
    mid: list[torch.Size] = []
    unet.mid_block.register_forward_hook(lambda m, a, o: mid.append(o.shape))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        unet(**inputs)
        res = cn(**{k: v for k, v in inputs.items()}, hint=cn.encode_hint(cond_image()))
    assert [r.shape for r in res] == [*skips, *mid]


def test_global_pool_averages_every_residual():
    unet = make_unet(Family.SD1)
    cn = make_controlnet(unet, open_zero=True)
    pooled = make_controlnet(unet, open_zero=True, global_pool=True)
    pooled.load_state_dict(cn.state_dict())
    inputs = unet_inputs(unet)
    hint = cn.encode_hint(cond_image())
    with torch.no_grad():
        full, avg = cn(**inputs, hint=hint), pooled(**inputs, hint=hint)
    for f, a in zip(full, avg):
        assert a.shape == (*f.shape[:2], 1, 1)
        torch.testing.assert_close(a, f.mean(dim=(2, 3), keepdim=True))


@pytest.mark.parametrize(
    ("family", "unet_params", "cn_params"),
    [(Family.SD1, 859_520_964, 361_279_120), (Family.SD2, 865_910_724, 364_228_240)],
    ids=["sd15", "sd21"],
)
def test_real_size_parameter_counts_on_meta(family, unet_params, cn_params):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(family))
    cn = ControlNet.from_unet(unet)
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in cn.parameters()) == cn_params
    assert cn.num_residuals == 13


def test_sdxl_real_size_has_ten_residuals_on_meta():
    cn = ControlNet.from_config(unet_config(Family.SDXL))
    assert cn.num_residuals == 10
    assert [z.out_channels for z in cn.controlnet_down_blocks] == [320] * 4 + [640] * 3 + [1280] * 2
    assert cn.conv_in.weight.is_meta


def test_hint_encoder_has_the_released_layout():
    cn = ControlNet.from_config(unet_config(Family.SD1))
    convs = [
        cn.controlnet_cond_embedding.conv_in,
        *cn.controlnet_cond_embedding.blocks,
        cn.controlnet_cond_embedding.conv_out,
    ]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 16, 1),
        (16, 16, 1),
        (16, 32, 2),
        (32, 32, 1),
        (32, 96, 2),
        (96, 96, 1),
        (96, 256, 2),
        (256, 320, 1),
    ]
    assert all(c.kernel_size == (3, 3) for c in convs)


def test_a_new_controlnet_scales_the_condition_down_as_the_base_vae_does(tmp_path):
    """A base whose VAE scales images down 4x (one level fewer than SD's): a new ControlNet's hint
    encoder halves the condition twice (the paper's widths, the last 256 wide), so the hint lands
    on the latents' grid and generation runs; the file keeps the depth; one made for an 8x VAE is
    refused in one line naming both, instead of failing inside the first step on shapes. The same
    for a T2I-Adapter."""
    from diffusers import AutoencoderKL

    from controlnet.errors import CheckpointError
    from controlnet.families.sd.base import UNetBase
    from controlnet.formats import load_controlnet, save_controlnet
    from controlnet.model.control import Control
    from controlnet.text.tokenizer import clip_tokenizer
    from tiny import make_text_encoder

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    base = UNetBase(Family.SD1, make_unet(Family.SD1), vae, make_text_encoder(), clip_tokenizer(Family.SD1))
    assert base.vae_scale_factor == 4
    cn = base.new_controlnet().eval()
    assert cn.config.hint_block_channels == (16, 32, 256) and cn.config.hint_downscale == 4
    assert ControlNetConfig.hint_widths(8) == ControlNetConfig().hint_block_channels
    base.check_controlnet(cn, controlnet_name="CN", base_name="BASE")

    x = unet_inputs(base.unet)
    hint = torch.rand(2, 3, 4 * x["sample"].shape[-2], 4 * x["sample"].shape[-1])  # 4x the latents' side
    with torch.no_grad():
        alone = base.predict(x["sample"], x["timestep"], x["encoder_hidden_states"])
        fresh = base.predict(
            x["sample"],
            x["timestep"],
            x["encoder_hidden_states"],
            [Control(cn, base.control_hint(cn, hint), [1.0] * cn.num_residuals)],
        )
        assert torch.equal(fresh, alone)
        for zero in cn.zero_convs():
            zero.weight.normal_(0, 0.1)
        controlled = base.predict(
            x["sample"],
            x["timestep"],
            x["encoder_hidden_states"],
            [Control(cn, base.control_hint(cn, hint), [1.0] * cn.num_residuals)],
        )
    assert controlled.shape == alone.shape and not torch.allclose(controlled, alone)
    for layout in ("original", "diffusers"):
        name = "cn.safetensors" if layout == "original" else "folder"
        back = load_controlnet(save_controlnet(cn, tmp_path / f"{layout}-{name}", layout)[0])
        assert back.config.hint_block_channels == (16, 32, 256)
        assert all(torch.equal(a, b) for a, b in zip(cn.state_dict().values(), back.state_dict().values()))

    sd = base.new_controlnet({"hint_block_channels": (16, 32, 96, 256)})  # 8x, as given
    with pytest.raises(
        CheckpointError, match=r"^CN's hint encoder scales the condition down 8x, but BASE's VAE 4x"
    ):
        base.check_controlnet(sd, controlnet_name="CN", base_name="BASE")
    # a T2I-Adapter likewise: made for this VAE it fits, one made for SD's is refused
    from controlnet.families.sd.adapter import T2IAdapter

    unet_config = dict(base.unet.config)
    adapter = T2IAdapter.for_unet(unet_config, latent_factor=4).eval()
    base.check_controlnet(adapter, controlnet_name="A", base_name="BASE")
    with torch.no_grad():
        unit = Control(adapter, base.control_hint(adapter, hint), [1.0] * adapter.num_residuals)
        adapted = base.predict(x["sample"], x["timestep"], x["encoder_hidden_states"], [unit])
    assert adapted.shape == alone.shape and not torch.allclose(adapted, alone)
    with pytest.raises(
        ValueError, match=r"^A scales the condition down 8x to the latents, but BASE's VAE 4x"
    ):
        base.check_controlnet(T2IAdapter.for_unet(unet_config), controlnet_name="A", base_name="BASE")


def test_bad_inputs_are_named():
    unet = make_unet(Family.SD1)
    cn = make_controlnet(unet)
    with pytest.raises(ValueError, match=r"condition must have shape \(B, 3, H, W\)"):
        cn.encode_hint(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="unknown ControlNet config keys"):
        ControlNetConfig.from_dict({"hint_channels": 3, "bogus": 1})
    xl = make_unet(Family.SDXL)
    cnx = make_controlnet(xl)
    inputs = unet_inputs(xl)
    inputs.pop("added_cond_kwargs")
    with pytest.raises(ValueError, match="text_embeds"):
        cnx(**inputs, hint=cnx.encode_hint(cond_image()))
    cfg = dict(unet.config)
    cfg["class_embed_type"] = "timestep"
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNet.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
