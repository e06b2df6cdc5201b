"""T2I-Adapters (families/sd/adapter.py): our module holds diffusers' T2IAdapter keys as they are
and computes its features, in each kind (full, SDXL's, light)."""

from __future__ import annotations

import pytest
import torch
from diffusers import T2IAdapter as DiffusersAdapter

from controlnet.families.sd.adapter import AdapterConfig, T2IAdapter

KINDS = {
    "full": {
        "channels": [8, 16, 32, 32],
        "num_res_blocks": 2,
        "downscale_factor": 8,
        "adapter_type": "full_adapter",
    },
    "xl": {
        "channels": [8, 16, 32, 32],
        "num_res_blocks": 2,
        "downscale_factor": 16,
        "adapter_type": "full_adapter_xl",
    },
    "light": {
        "channels": [8, 16, 32],
        "num_res_blocks": 2,
        "downscale_factor": 8,
        "adapter_type": "light_adapter",
    },
    "sketch": {
        "in_channels": 1,
        "channels": [8, 16, 32, 32],
        "num_res_blocks": 1,
        "adapter_type": "full_adapter",
    },
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_equals_diffusers_t2i_adapter_key_for_key(kind):
    torch.manual_seed(0)
    theirs = DiffusersAdapter(**KINDS[kind]).eval()
    ours = T2IAdapter(AdapterConfig.from_dict(KINDS[kind])).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(image.mean(1, keepdim=True) if kind == "sketch" else image)
        got = ours(torch.zeros(2, 4, 16, 16), 0, torch.zeros(2, 3, 8), image)
    assert len(got) == len(want) == ours.num_residuals
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="adapter_type must be one of"):
        AdapterConfig(adapter_type="huge")
    a = T2IAdapter(AdapterConfig.from_dict(KINDS["full"]))
    with pytest.raises(ValueError, match="multiples of 8, got \\(60, 64\\)"):
        a.features(torch.rand(1, 3, 60, 64))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_generation_equals_diffusers_adapter_pipeline(family, tmp_path, monkeypatch):
    """A T2I-Adapter of the base's kind, with its weight, classifier-free guidance and two samples:
    our generation gives the latents of diffusers' StableDiffusion(XL)AdapterPipeline to float32
    rounding (SDXL: acting on the first half of the steps, diffusers' adapter_conditioning_factor)."""
    import numpy as np
    from diffusers import (
        DDIMScheduler,
        StableDiffusionAdapterPipeline,
        StableDiffusionXLAdapterPipeline,
    )
    from PIL import Image

    from controlnet import Family
    from controlnet.generation.check import check
    from controlnet.generation.generate import generate
    from controlnet.generation.request import ControlRequest, GenerationRequest
    from controlnet.generation.sampling import initial_noise
    from test_diffusers_parity import SD_SCHEDULE
    from tiny import make_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    xl = family == "sdxl"
    base = make_base(Family.SDXL if xl else Family.SD1)
    widths = list(base.unet.config.block_out_channels)
    # SD1: one feature per encoder level; SDXL: one more, after the middle block
    config = {"channels": [*widths, widths[-1]] if xl else widths, "num_res_blocks": 1, "downscale_factor": 8}
    if xl:
        config.update(downscale_factor=16, adapter_type="full_adapter_xl")
    torch.manual_seed(3)
    theirs = DiffusersAdapter(**config).eval()
    adapter = T2IAdapter(AdapterConfig.from_dict(config)).eval()
    adapter.load_state_dict(theirs.state_dict())
    size, steps, n, seed, strength, end = base.native_size, 4, 2, 11, 0.8, (0.5 if xl else 1.0)
    image = np.zeros((size, size, 3), np.uint8)
    image[20:100, 30:90] = 255
    Image.fromarray(image).save(tmp_path / "cond.png")
    request = GenerationRequest(
        prompt="a red square",
        added_prompt="",
        negative_prompt="blurry",
        prompt_syntax="plain",
        controls=[ControlRequest(str(tmp_path / "cond.png"), strength=strength, end=end)],
        sampler="ddim",
        steps=steps,
        guidance=7.5,
        seed=seed,
        num_samples=n,
        resolution=size,
    )
    ours = generate(check(request), base, [adapter], progress=False).latents
    parts = {
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "tokenizer": base.tokenizer,
        "unet": base.unet,
    }
    parts["scheduler"] = DDIMScheduler(
        **SD_SCHEDULE,
        prediction_type=base.schedule["prediction_type"],
        clip_sample=False,
        set_alpha_to_one=False,
    )
    extra = {}
    if xl:
        parts.update(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
        pipe = StableDiffusionXLAdapterPipeline(**parts, adapter=theirs)
        extra["adapter_conditioning_factor"] = end
    else:
        pipe = StableDiffusionAdapterPipeline(
            **parts,
            adapter=theirs,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    noise = initial_noise(
        (n, 4, *base.latent_size((size, size))), [seed + i for i in range(n)], "cpu", torch.float32
    )
    with torch.no_grad():
        want = pipe(
            prompt="a red square",
            negative_prompt="blurry",
            image=Image.open(tmp_path / "cond.png"),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            num_images_per_prompt=n,
            latents=noise,
            adapter_conditioning_scale=strength,
            output_type="latent",
            **extra,
        ).images
    assert (ours - want).abs().max() < 1e-4, float((ours - want).abs().max())
    # and the adapter did act: without it the latents differ
    plain = generate(
        check(GenerationRequest(**{**request.__dict__, "controls": []})), base, [], progress=False
    )
    assert (plain.latents - ours).abs().max() > 1e-3


def test_a_diffusers_adapter_folder_loads_and_runs_from_the_command_line(tmp_path, capsys):
    """TencentARC's adapters as diffusers folders: detected, loaded key for key, given to
    `generate --controlnet` like a ControlNet; an SDXL adapter on an SD1 base is refused in one line
    naming both."""
    from controlnet import Family
    from controlnet.cli import main
    from controlnet.formats import detect, load_controlnet, save_base
    from tiny import make_base

    base = make_base(Family.SD1)
    base_file = save_base(base, tmp_path / "base.safetensors")[0]
    widths = list(base.unet.config.block_out_channels)
    torch.manual_seed(4)
    DiffusersAdapter(channels=widths, num_res_blocks=1).save_pretrained(tmp_path / "adapter")
    DiffusersAdapter(
        channels=[*widths[:3], widths[2]],
        num_res_blocks=1,
        downscale_factor=16,
        adapter_type="full_adapter_xl",
    ).save_pretrained(tmp_path / "adapter_xl")
    assert detect(tmp_path / "adapter").layout == "T2I-Adapter folder"
    assert main(["inspect", str(tmp_path / "adapter_xl")]) == 0
    assert "family:     SDXL" in capsys.readouterr().out
    loaded = load_controlnet(tmp_path / "adapter")
    want = DiffusersAdapter.from_pretrained(tmp_path / "adapter").state_dict()
    assert isinstance(loaded, T2IAdapter) and all(
        torch.equal(v, want[k]) for k, v in loaded.state_dict().items()
    )

    image = torch.zeros(128, 128, 3, dtype=torch.uint8)
    image[30:90, 30:90] = 255
    from PIL import Image

    Image.fromarray(image.numpy()).save(tmp_path / "cond.png")
    common = ["generate", "--base", str(base_file), "--image", str(tmp_path / "cond.png"), "--steps", "2"]
    common += ["--resolution", "128", "--seed", "1", "--quiet"]
    assert main([*common, "--controlnet", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*_0.png"))) == 1
    capsys.readouterr()
    assert main([*common, "--controlnet", str(tmp_path / "adapter_xl"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "an SDXL T2I-Adapter" in err and "SD1.x/SD2.x" in err and len(err.splitlines()) == 1, err


def test_a_controlnet_and_an_adapter_in_one_call_equal_diffusers_parts(tmp_path, monkeypatch):
    """A ControlNet and a T2I-Adapter in one generation: the latents of diffusers'
    StableDiffusionControlNetPipeline whose UNet also takes diffusers' T2IAdapter's features (as
    the community ControlNet + Adapter pipelines do), to float32 rounding."""
    import numpy as np
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from controlnet import Family
    from controlnet.formats import Format, save_controlnet
    from controlnet.generation.check import check
    from controlnet.generation.generate import generate
    from controlnet.generation.request import ControlRequest, GenerationRequest
    from controlnet.generation.sampling import initial_noise
    from test_diffusers_parity import SD_SCHEDULE
    from tiny import make_base, make_controlnet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = make_base(Family.SD1)
    cn = make_controlnet(base.unet, open_zero=True, seed=2)
    folder = save_controlnet(cn, tmp_path / "cn", Format.DIFFUSERS)[0]
    torch.manual_seed(5)
    theirs = DiffusersAdapter(channels=list(base.unet.config.block_out_channels), num_res_blocks=1).eval()
    adapter = T2IAdapter(AdapterConfig.from_dict(dict(theirs.config))).eval()
    adapter.load_state_dict(theirs.state_dict())
    size, steps, n, seed = base.native_size, 4, 1, 3
    image = np.zeros((size, size, 3), np.uint8)
    image[24:100, 16:80] = 255
    Image.fromarray(image).save(tmp_path / "cond.png")
    controls = [
        ControlRequest(str(tmp_path / "cond.png"), strength=0.9),
        ControlRequest(str(tmp_path / "cond.png"), strength=0.7),
    ]
    request = GenerationRequest(
        prompt="a red square",
        added_prompt="",
        negative_prompt="",
        prompt_syntax="plain",
        controls=controls,
        sampler="ddim",
        steps=steps,
        guidance=5.0,
        seed=seed,
        num_samples=n,
        resolution=size,
    )
    ours = generate(check(request), base, [cn, adapter], progress=False).latents

    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        controlnet=ControlNetModel.from_pretrained(folder).eval(),
        scheduler=DDIMScheduler(
            **SD_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        features = [f * 0.7 for f in theirs(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)]
    plain_forward = base.unet.forward

    def with_adapter(*args, **kwargs):
        batch = args[0].shape[0]
        kwargs["down_intrablock_additional_residuals"] = [f.repeat(batch, 1, 1, 1) for f in features]
        return plain_forward(*args, **kwargs)

    monkeypatch.setattr(base.unet, "forward", with_adapter)
    noise = initial_noise((n, 4, *base.latent_size((size, size))), [seed], "cpu", torch.float32)
    with torch.no_grad():
        want = pipe(
            prompt="a red square",
            negative_prompt="",
            image=Image.open(tmp_path / "cond.png"),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=5.0,
            latents=noise,
            controlnet_conditioning_scale=0.9,
            output_type="latent",
        ).images
    assert (ours - want).abs().max() < 1e-4, float((ours - want).abs().max())


def _tencentarc(state: dict, kind: str, per_level: int) -> dict:
    """diffusers' T2IAdapter keys back in TencentARC's original layout (as diffusers' conversion
    script maps them): full resnets numbered through the levels, light ones nested per level."""
    import re

    out = {}
    for k, v in state.items():
        k = k.removeprefix("adapter.")
        if kind == "full":
            m = re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", k)
            if m:
                k = f"body.{int(m.group(1)) * per_level + int(m.group(2))}.{m.group(3)}"
            elif (m := re.match(r"body\.(\d+)\.in_conv\.(.*)", k)) is not None:
                k = f"body.{int(m.group(1)) * per_level}.in_conv.{m.group(2)}"
        else:
            k = re.sub(r"body\.(\d+)\.resnets\.", r"body.\1.body.", k)
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("kind", ["full", "sketch", "light"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tencentarc_files_load_key_for_key(kind, suffix, tmp_path):
    """TencentARC's original adapter files (the full kind, its one-channel sketch variant, the
    light kind), as .pth or safetensors: the architecture read off the tensors, every key placed,
    the features those of the same weights in diffusers' T2IAdapter."""
    from safetensors.torch import save_file

    from controlnet.formats import detect, load_controlnet

    config = dict(KINDS[kind])
    torch.manual_seed(2)
    theirs = DiffusersAdapter(**config).eval()
    n = config["num_res_blocks"]
    state = _tencentarc(theirs.state_dict(), "light" if kind == "light" else "full", n)
    path = tmp_path / f"t2iadapter_{kind}_sd14v1{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    assert detect(path).layout == "T2I-Adapter file"
    from controlnet.formats.tools import inspect_checkpoint

    said = "\n".join(inspect_checkpoint(path).lines())  # no weights read
    assert "T2I-Adapter file" in said and "controlnet: loads" in said and f"num_res_blocks={n}" in said
    ours = load_controlnet(path)
    assert isinstance(ours, T2IAdapter) and ours.config.channels == config["channels"]
    assert ours.config.in_channels == config.get("in_channels", 3) and ours.config.num_res_blocks == n
    image = torch.rand(1, config.get("in_channels", 3), 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a, b in zip(ours.features(image), theirs(image), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["full", "light", "xl"])
def test_convert_round_trips_bitwise_through_every_layout(kind, tmp_path):
    """`convert` writes an adapter in each layout (ours, diffusers' folder, TencentARC's keys - not
    for SDXL's, which was never released that way: refused in one line) and reading it back gives
    the same tensors, bit for bit; diffusers reads our folder."""
    from controlnet.formats import convert, detect, load_controlnet

    torch.manual_seed(6)
    DiffusersAdapter(**KINDS[kind]).save_pretrained(tmp_path / "src")
    want = load_controlnet(tmp_path / "src").state_dict()
    layouts = ["controlnet", "diffusers"] + ([] if kind == "xl" else ["original"])
    for fmt in layouts:
        name = f"out-{fmt}" if fmt == "diffusers" else f"out-{fmt}.safetensors"
        out = convert(tmp_path / "src", tmp_path / name, fmt)[0]
        assert detect(out).format.value == fmt
        back = convert(out, tmp_path / f"back-{fmt}", "diffusers")[0]
        for path in (out, back):
            got = load_controlnet(path).state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    theirs = DiffusersAdapter.from_pretrained(tmp_path / "out-diffusers").state_dict()
    assert all(torch.equal(theirs[k], want[k]) for k in want)
    if kind == "xl":
        with pytest.raises(Exception, match="an SDXL T2I-Adapter has no original layout"):
            convert(tmp_path / "src", tmp_path / "nope.safetensors", "original")
        assert not (tmp_path / "nope.safetensors").exists() and not (tmp_path / "nope").exists()
