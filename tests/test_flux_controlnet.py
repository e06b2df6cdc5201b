"""The Flux ControlNet (our controlled copy of the first transformer blocks): a fresh one leaves
the base bit for bit unchanged, the published layout loads key for key and computes what
diffusers' FluxControlNetModel computes, and the real sizes are the published ones."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel

from controlnet.families.flux import FluxControlNet, FluxControlNetConfig

TINY = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 3,
    "num_single_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 10,
    "guidance_embeds": True,
    "axes_dims_rope": [2, 2, 4],
}


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY).eval()


def inputs(seed: int = 1, batch: int = 2, side: int = 4, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = side * side
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, tokens, TINY["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, text, TINY["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids.reshape(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def condition(seed: int = 2, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, TINY["in_channels"], generator=torch.Generator().manual_seed(seed))


def open_zero_layers(cn: torch.nn.Module, seed: int = 3) -> None:
    """Random weights in every zero-initialised layer, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def base_output(transformer, x, res=None) -> torch.Tensor:
    kw = (
        {}
        if res is None
        else {"controlnet_block_samples": res.double, "controlnet_single_block_samples": res.single}
    )
    with torch.no_grad():
        return transformer(**x, **kw).sample


@pytest.mark.parametrize(("double", "single"), [(2, 0), (1, 2), (3, 4)])
def test_a_fresh_controlnet_leaves_the_base_bit_for_bit(double, single):
    base = tiny_transformer()
    cn = FluxControlNet.from_transformer(base, FluxControlNetConfig(double, single))
    x = inputs()
    with torch.no_grad():
        res = cn(condition=condition(), **x)
    assert all(not r.any() for r in [*(res.double or []), *(res.single or [])])
    assert torch.equal(base_output(base, x, res), base_output(base, x))
    # the copy is exact: every shared tensor equals the base's
    state = base.state_dict()
    for k, v in cn.state_dict().items():
        if not k.startswith("controlnet_"):
            assert torch.equal(v, state[k]), k
    # once the zero layers open, the residuals reach the base
    open_zero_layers(cn)
    with torch.no_grad():
        res = cn(condition=condition(), **x)
    assert not torch.equal(base_output(base, x, res), base_output(base, x))


def diffusers_twin(cn: FluxControlNet) -> FluxControlNetModel:
    peer = FluxControlNetModel(
        **{k: v for k, v in TINY.items() if k not in ("num_layers", "num_single_layers")},
        num_layers=cn.config.num_layers,
        num_single_layers=cn.config.num_single_layers,
        num_mode=cn.config.num_mode,
    ).eval()
    peer.load_state_dict(cn.state_dict(), strict=True)
    return peer


@pytest.mark.parametrize("num_mode", [None, 4], ids=["plain", "union"])
def test_equals_diffusers_flux_controlnet_key_for_key(num_mode):
    base = tiny_transformer()
    cn = FluxControlNet.from_transformer(base, FluxControlNetConfig(2, 3, num_mode)).eval()
    open_zero_layers(cn)
    peer = diffusers_twin(cn)
    assert set(peer.state_dict()) == set(cn.state_dict())  # the published layout, as is
    x = inputs()
    modes = [0, 3] if num_mode else [None]
    for m in modes:
        mode = None if m is None else torch.full((2, 1), m)
        with torch.no_grad():
            ours = cn(condition=condition(), mode=mode, scale=0.7, **x)
            theirs = peer(
                controlnet_cond=condition(),
                controlnet_mode=mode,
                conditioning_scale=0.7,
                return_dict=False,
                **x,
            )
        for a, b in zip([*ours.double, *ours.single], [*theirs[0], *theirs[1]], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # and the base reads them the same way
        torch.testing.assert_close(
            base_output(base, x, ours),
            base(**x, controlnet_block_samples=theirs[0], controlnet_single_block_samples=theirs[1]).sample,
            rtol=1e-5,
            atol=1e-6,
        )
    if num_mode:
        with torch.no_grad():  # one mode for every sample, as generation gives it (no tensor to read back)
            same = cn(condition=condition(), mode=3, scale=0.7, **x)
        assert all(
            torch.equal(a, b) for a, b in zip([*same.double, *same.single], [*ours.double, *ours.single])
        )
        for bad in (torch.full((2, 1), 4), 4, -1):
            with torch.no_grad(), pytest.raises(ValueError, match=r"control mode must be in 0-3, got"):
                cn(condition=condition(), mode=bad, **x)
        with torch.no_grad(), pytest.raises(ValueError, match=r"needs a control mode"):
            cn(condition=condition(), **x)


def test_bad_copies_are_refused():
    base = tiny_transformer()
    with pytest.raises(
        ValueError, match=r"cannot copy 4 double and 0 single blocks of a transformer that has 3 and 4"
    ):
        FluxControlNet.from_transformer(base, FluxControlNetConfig(4, 0))
    with pytest.raises(ValueError, match=r"copies at least one block"):
        FluxControlNetConfig(0, 0)
    reads = base.config.in_channels  # a hint encoder whose packed patches are not the latents' width
    with pytest.raises(
        ValueError,
        match=rf"pixel_hint_channels={reads} packs to {4 * reads} features a token, but the base's "
        rf"transformer reads {reads} \(in_channels\): use pixel_hint_channels={reads // 4}",
    ):
        FluxControlNet.from_transformer(base, FluxControlNetConfig(1, 0, pixel_hint_channels=reads))


@pytest.mark.parametrize(
    ("config", "guidance", "expected"),
    [
        (FluxControlNetConfig(5, 10, num_mode=10), True, 3_301_956_608),  # InstantX / Shakker Union
        (FluxControlNetConfig(2, 0), True, 743_790_592),
        (FluxControlNetConfig(2, 0), False, 743_790_592 - 10_229_760),  # schnell: no guidance input
    ],
)
def test_real_sizes_on_the_meta_device(config, guidance, expected):
    """Flux.1-dev's ControlNets (diffusers' defaults are its sizes; dev reads a guidance input)."""
    cn = FluxControlNet({"guidance_embeds": guidance}, config, device="meta")
    assert sum(p.numel() for p in cn.parameters()) == expected
    with torch.device("meta"):
        peer = FluxControlNetModel(
            num_layers=config.num_layers,
            num_single_layers=config.num_single_layers,
            num_mode=config.num_mode,
            guidance_embeds=guidance,
        )
    assert {k: tuple(v.shape) for k, v in cn.state_dict().items()} == {
        k: tuple(v.shape) for k, v in peer.state_dict().items()
    }


# ------------------------------------------------------------------------------------ files
#: Flux.1's head size and rotary split (what a published file implies), at a width of one head
FILE_SIZE = {**TINY, "attention_head_dim": 128, "num_attention_heads": 1, "axes_dims_rope": [16, 56, 56]}


def file_controlnet(num_mode=None) -> FluxControlNet:
    torch.manual_seed(4)
    base = FluxTransformer2DModel(**FILE_SIZE).eval()
    cn = FluxControlNet.from_transformer(base, FluxControlNetConfig(2, 1, num_mode)).eval()
    open_zero_layers(cn)
    return cn


def same(a: FluxControlNet, b: FluxControlNet) -> None:
    assert a.config == b.config
    assert a.transformer_config == b.transformer_config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("num_mode", [None, 3], ids=["plain", "union"])
def test_every_layout_round_trips_bitwise(tmp_path, num_mode):
    from controlnet.formats import Format, convert, detect, load_controlnet, save_controlnet

    cn = file_controlnet(num_mode)
    ours = save_controlnet(cn, tmp_path / "cn.safetensors")[0]
    assert detect(ours).family == "flux" and detect(ours).format is Format.CONTROLNET
    published = convert(ours, tmp_path / "published.safetensors", "original")[0]
    d = detect(published)
    assert (
        d.format is Format.ORIGINAL
        and "published layout" in d.layout
        and not d.tensors.metadata.get("family")
    )
    folder = convert(published, tmp_path / "folder", "diffusers")[0]
    back = convert(folder, tmp_path / "back.safetensors", "controlnet")[0]
    for path in (ours, published, folder, back):
        same(cn, load_controlnet(path))
    # diffusers reads our folder as its own FluxControlNetModel, tensor for tensor
    peer = FluxControlNetModel.from_pretrained(folder)
    assert peer.config.num_mode == num_mode and peer.config.num_layers == 2
    theirs = peer.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in cn.state_dict().items())


def test_inspect_and_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    from controlnet.cli import main
    from controlnet.formats import CheckpointError, load_controlnet, save_controlnet

    cn = file_controlnet(num_mode=4)
    path = save_controlnet(cn, tmp_path / "union.safetensors", "original")[0]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:     Flux.1-dev" in out and "union_modes=4" in out and "double_blocks=2" in out
    assert "check:      controlnet: loads" in out

    state = {k: v.contiguous() for k, v in cn.state_dict().items()}
    del state["controlnet_blocks.1.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    assert main(["inspect", str(tmp_path / "broken.safetensors")]) == 1
    assert "missing keys (1): controlnet_blocks.1.bias" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: Flux\.1 ControlNet: missing keys"):
        load_controlnet(tmp_path / "broken.safetensors")

    small = file_controlnet_of_head(8)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match=r"heads of 8 channels, not Flux\.1's 128: the rotary axes"):
        load_controlnet(tmp_path / "small.safetensors")


def file_controlnet_of_head(head: int) -> FluxControlNet:
    base = FluxTransformer2DModel(**TINY).eval()
    assert TINY["attention_head_dim"] == head
    return FluxControlNet.from_transformer(base, FluxControlNetConfig(1, 0))


# ------------------------------------------------------------------------------------ XLabs' kind
def test_a_pixel_hint_controlnet_equals_diffusers_and_the_base_takes_its_residuals_in_turn():
    """XLabs' ControlNets read the condition as pixels through the paper's hint encoder (its last
    conv zero), and the base takes their residuals in turn (block j: j mod n)."""
    from controlnet.families.flux.base import FluxBase
    from controlnet.model.control import Control
    from tiny_flux import tiny_flux_base

    base: FluxBase = tiny_flux_base()
    cn = FluxControlNet.from_transformer(
        base.transformer, FluxControlNetConfig(2, 0, pixel_hint_channels=4)
    ).eval()
    assert not cn.input_hint_block.conv_out.weight.any()  # the zero layer of a fresh one
    open_zero_layers(cn)
    with torch.no_grad():
        cn.input_hint_block.conv_out.weight.normal_(0, 0.1)
    fields = {k: v for k, v in TINY.items() if k not in ("num_layers", "num_single_layers")}
    peer = FluxControlNetModel(
        **{**fields, "patch_size": 2}, num_layers=2, num_single_layers=0, conditioning_embedding_channels=4
    ).eval()
    peer.load_state_dict(cn.state_dict())
    x = inputs()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        ours = cn(condition=pixels, **x)
        theirs = peer(controlnet_cond=pixels, return_dict=False, **x)
        for a, b in zip(ours.double, theirs[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # through the base: our predict against the transformer taking diffusers' residuals in turn
        from controlnet.families.flux.patches import image_ids, pack, unpack

        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
        t = torch.tensor(700.0)
        common = {
            "hidden_states": pack(latents),
            "encoder_hidden_states": x["encoder_hidden_states"],
            "pooled_projections": x["pooled_projections"],
            "timestep": t.expand(2) / 1000,
            "img_ids": image_ids(8, 8, latents.device, latents.dtype),
            "txt_ids": torch.zeros(x["encoder_hidden_states"].shape[1], 3),
            "guidance": x["guidance"],
        }
        samples = peer(controlnet_cond=pixels, return_dict=False, **common)[0]
        want = base.transformer(
            **common, controlnet_block_samples=list(samples), controlnet_blocks_repeat=True
        ).sample
        added = {"pooled": x["pooled_projections"], "guidance": x["guidance"]}
        control = Control(cn, pixels, [1.0, 1.0])
        got = base.predict(latents, t, x["encoder_hidden_states"], [control], added=added)
        torch.testing.assert_close(got, unpack(want, 8, 8), rtol=1e-5, atol=1e-5)


def test_xlabs_layout_round_trips(tmp_path, capsys):
    from safetensors.torch import load_file

    from controlnet.cli import main
    from controlnet.formats import convert, detect, load_controlnet, save_controlnet

    torch.manual_seed(4)
    base = FluxTransformer2DModel(**FILE_SIZE).eval()
    cn = FluxControlNet.from_transformer(base, FluxControlNetConfig(2, 0, pixel_hint_channels=4)).eval()
    open_zero_layers(cn)
    xlabs = save_controlnet(cn, tmp_path / "flux-canny-controlnet-v3.safetensors", "original")[0]
    keys = set(load_file(xlabs))
    assert {
        "pos_embed_input.weight",
        "input_hint_block.14.weight",
        "double_blocks.1.img_attn.qkv.weight",
    } <= keys
    assert not any(k.startswith(("transformer_blocks.", "controlnet_x_embedder")) for k in keys)
    assert detect(xlabs).family == "flux" and "published layout" in detect(xlabs).layout
    folder = convert(xlabs, tmp_path / "folder", "diffusers")[0]
    back = convert(folder, tmp_path / "back.safetensors", "controlnet")[0]
    for path in (xlabs, folder, back):
        same(cn, load_controlnet(path))
    assert FluxControlNetModel.from_pretrained(folder).config.conditioning_embedding_channels == 4
    assert main(["inspect", str(xlabs)]) == 0
    assert "double_blocks=2" in capsys.readouterr().out


def test_a_pixel_hint_encoder_scales_the_condition_as_the_base_vae_does(tmp_path, capsys):
    """A VAE of another factor than Flux.1's 8 (the tiny base's: 2x): a new ControlNet's hint
    encoder halves the image as many times as the VAE does, so the hint lands on the latents'
    grid; one made for another VAE is refused in one line; XLabs' layout keeps the depth (its conv
    count); diffusers' class, whose hint encoder is 8x only, is refused before anything is written."""
    from controlnet.cli import main
    from controlnet.formats import load_controlnet, save_controlnet
    from controlnet.model.control import Control
    from tiny_flux import tiny_flux_base

    base = tiny_flux_base()
    assert base.vae_scale_factor == 2
    cn = base.new_controlnet({"num_layers": 1, "pixel_hint_channels": 4}).eval()
    assert cn.config.pixel_hint_scale == 2
    strides = [m.stride[0] for m in cn.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides.count(2) == 1
    base.check_controlnet(cn, controlnet_name="CN", base_name="BASE")
    x = inputs()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    added = {"pooled": x["pooled_projections"], "guidance": x["guidance"]}
    t = torch.tensor(700.0)
    with torch.no_grad():
        alone = base.predict(latents, t, x["encoder_hidden_states"], added=added)
        fresh = base.predict(
            latents, t, x["encoder_hidden_states"], [Control(cn, pixels, [1.0])], added=added
        )
        assert torch.equal(fresh, alone)  # the hint encoder's last conv is the zero layer
        cn.input_hint_block.conv_out.weight.normal_(0, 0.1)
        open_zero_layers(cn)
        hint = cn.embed_condition(pixels)
        assert hint.shape == (2, 16, cn.inner_dim)  # one per 2x2 patch of the 8x8 latents
        controlled = base.predict(
            latents, t, x["encoder_hidden_states"], [Control(cn, pixels, [1.0])], added=added
        )
        assert controlled.shape == alone.shape and not torch.allclose(controlled, alone)

    flux1 = base.new_controlnet(FluxControlNetConfig(1, 0, pixel_hint_channels=4))  # 8x, as given
    with pytest.raises(
        ValueError, match=r"CN's hint encoder scales the condition down 8x, but BASE's VAE 2x"
    ):
        base.check_controlnet(flux1, controlnet_name="CN", base_name="BASE")

    torch.manual_seed(4)  # XLabs' files hold Flux.1's heads (their rotary split is not stored)
    wide = FluxTransformer2DModel(**FILE_SIZE).eval()
    cn = FluxControlNet.from_transformer(
        wide, FluxControlNetConfig(1, 0, pixel_hint_channels=4, pixel_hint_scale=2)
    )
    open_zero_layers(cn)
    xlabs = save_controlnet(cn, tmp_path / "xlabs.safetensors", "original")[0]
    back = load_controlnet(xlabs)
    same(cn, back)
    assert back.config.pixel_hint_scale == 2
    assert main(["inspect", str(xlabs)]) == 0 and "condition=pixels, 2x" in capsys.readouterr().out
    assert main(["convert", str(xlabs), str(tmp_path / "folder"), "--to", "diffusers"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scales a pixel hint down 8x only" in err and "2x" in err
    assert not (tmp_path / "folder").exists()
    union = FluxControlNet.from_transformer(
        wide, FluxControlNetConfig(1, 0, num_mode=2, pixel_hint_channels=4)
    )
    with pytest.raises(ValueError, match=r"XLabs' layout .* holds no Union control modes"):
        save_controlnet(union, tmp_path / "union.safetensors", "original")
    assert not (tmp_path / "union.safetensors").exists()


def test_an_inpainting_controlnet_reads_the_mask_beside_the_latents(tmp_path):
    """Alimama's kind: the condition embedder reads the packed latents of the masked image and the
    packed 1 - mask (4 more channels); read off a published file, round-tripped, and fed by the
    base's control_hint from an inpaint map (masked pixels -1)."""
    from controlnet.formats import convert, inspect_checkpoint, load_controlnet, save_controlnet
    from tiny_flux import tiny_flux_base

    torch.manual_seed(4)
    base = FluxTransformer2DModel(**FILE_SIZE).eval()
    cn = FluxControlNet.from_transformer(base, FluxControlNetConfig(2, 1, extra_condition_channels=4)).eval()
    assert cn.controlnet_x_embedder.weight.shape[1] == FILE_SIZE["in_channels"] + 4 and cn.mask_channels == 1
    open_zero_layers(cn)
    published = save_controlnet(cn, tmp_path / "alimama.safetensors", "original")[0]
    folder = convert(published, tmp_path / "folder", "diffusers")[0]
    for path in (published, folder):
        same(cn, load_controlnet(path))
    assert inspect_checkpoint(published).controlnet["inpainting"] is True

    world = tiny_flux_base()
    small = FluxControlNet.from_transformer(
        world.transformer, FluxControlNetConfig(1, 0, extra_condition_channels=4)
    )
    condition = torch.rand(1, 3, 32, 48)
    condition[..., 8:24, 12:36] = -1.0  # the inpaint map's masked pixels
    hint = world.control_hint(small, condition)
    assert hint.shape == (1, 5, 16, 24)  # 4 latent channels and the kept region
    keep = hint[:, 4]
    assert not keep[..., 4:12, 6:18].any() and keep[..., :4, :].all()


def test_the_fast_path_compiles_each_repeated_block_not_the_whole_network():
    """Regional compilation: every double and single block (of the base and of the ControlNet) is
    compiled on its own, so each kind compiles once and every instance reuses it; the networks'
    own forwards stay as they are (nothing is compiled until it runs)."""
    from controlnet.families.flux.base import FluxBase
    from controlnet.model.fastpath import compile_modules

    base = tiny_transformer()
    cn = FluxControlNet.from_transformer(base, FluxControlNetConfig(2, 3)).eval()
    forwards = (base.forward, cn.forward)
    compile_modules([base], regions=FluxBase.blocks)
    compile_modules([cn])  # its own compile_regions
    for net in (base, cn):
        blocks = [m for m in net.modules() if isinstance(m, FluxBase.blocks)]
        assert len(blocks) == 5 + 2 * (net is base)
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert all(m._compiled_call_impl is None for m in net.modules() if not isinstance(m, FluxBase.blocks))
    assert (base.forward, cn.forward) == forwards
