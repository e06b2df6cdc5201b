"""SDXL Union ControlNets (families/sd/union.py): our model holds diffusers' ControlNetUnionModel
keys as they are and computes its residuals, one condition and several in one pass."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import ControlNetUnionModel

from controlnet import Family
from controlnet.families.sd.union import UnionConfig, UnionControlNet
from tiny import TINY_HINT, make_base

UNION = UnionConfig(
    num_control_type=4, num_trans_channel=8, num_trans_head=2, num_trans_layer=1, num_proj_channel=8
)


def union_pair(seed: int = 3, union: UnionConfig = UNION):
    base = make_base(Family.SDXL)
    ours = UnionControlNet.from_unet(base.unet, TINY_HINT, union).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking zero layers and task embeddings
        for name, p in ours.named_parameters():
            if p.abs().max() == 0 or name == "task_embedding":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    accepted = inspect.signature(ControlNetUnionModel.__init__).parameters
    fields = {k: v for k, v in base.unet.config.items() if k in accepted}
    theirs = ControlNetUnionModel(
        **fields, conditioning_embedding_out_channels=TINY_HINT.hint_block_channels, **union.to_dict()
    ).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: the published keys, as they are
    return base, ours, theirs


@pytest.mark.parametrize("types", [[2], [0, 3]], ids=["one", "two"])
def test_equals_diffusers_controlnet_union_model(types):
    base, ours, theirs = union_pair()
    g = torch.Generator().manual_seed(4)
    b, h = 2, base.latent_size((base.native_size,) * 2)
    sample = torch.randn(b, 4, *h, generator=g)
    context = torch.randn(b, 6, base.unet.config.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(b, _pooled_width(base), generator=g),
        "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * b),
    }
    images = [torch.rand(1, 3, base.native_size, base.native_size, generator=g) for _ in types]
    scales = [0.7, 1.2][: len(types)]
    kinds = torch.zeros(b, UNION.num_control_type)
    kinds[:, types] = 1
    with torch.no_grad():
        want_down, want_mid = theirs(
            sample,
            500,
            context,
            [i.expand(b, -1, -1, -1) for i in images],
            kinds,
            types,
            conditioning_scale=scales,
            added_cond_kwargs=added,
            return_dict=False,
        )
        got = ours.forward_union(
            sample, 500, context, [ours.encode_hint(i) for i in images], types, scales, added
        )
    assert len(got) == len(want_down) + 1
    for a, w in zip(got, [*want_down, want_mid], strict=True):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="control type 4: this Union ControlNet knows 0-3"):
        ours.forward_union(sample, 500, context, [ours.encode_hint(images[0])], [4], [1.0], added)


def _pooled_width(base) -> int:
    c = base.unet.config
    return c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim


@pytest.mark.parametrize("types", [[2], [0, 3]], ids=["one", "two"])
def test_generation_equals_diffusers_union_pipeline(types, tmp_path, monkeypatch):
    """One condition, and two in one pass, each with its control type and strength, classifier-free
    guidance: the latents of diffusers' StableDiffusionXLControlNetUnionPipeline to float32
    rounding."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionXLControlNetUnionPipeline
    from PIL import Image

    from controlnet.generation.check import check
    from controlnet.generation.generate import generate
    from controlnet.generation.request import ControlRequest, GenerationRequest
    from controlnet.generation.sampling import initial_noise
    from test_diffusers_parity import SD_SCHEDULE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, ours, theirs = union_pair(seed=8)
    size, steps, seed = base.native_size, 4, 9
    strengths = [0.8, 1.1][: len(types)]
    paths = []
    for i, _ in enumerate(types):
        image = np.zeros((size, size, 3), np.uint8)
        image[10 + 20 * i : 100, 20 : 110 - 30 * i] = 255
        paths.append(tmp_path / f"cond{i}.png")
        Image.fromarray(image).save(paths[-1])
    request = GenerationRequest(
        prompt="a red square",
        added_prompt="",
        negative_prompt="blurry",
        prompt_syntax="plain",
        controls=[
            ControlRequest(str(p), strength=s, control_type=t) for p, s, t in zip(paths, strengths, types)
        ],
        sampler="ddim",
        steps=steps,
        guidance=6.0,
        seed=seed,
        num_samples=1,
        resolution=size,
    )
    got = generate(check(request), base, [ours] * len(types), progress=False).latents
    pipe = StableDiffusionXLControlNetUnionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=base.unet,
        controlnet=theirs,
        scheduler=DDIMScheduler(
            **SD_SCHEDULE,
            prediction_type=base.schedule["prediction_type"],
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        add_watermarker=False,
    )
    noise = initial_noise((1, 4, *base.latent_size((size, size))), [seed], "cpu", torch.float32)
    with torch.no_grad():
        want = pipe(
            prompt="a red square",
            negative_prompt="blurry",
            control_image=[Image.open(p) for p in paths],
            control_mode=types,
            controlnet_conditioning_scale=strengths if len(types) > 1 else strengths[0],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=6.0,
            latents=noise,
            output_type="latent",
        ).images
    assert (got - want).abs().max() < 1e-4, float((got - want).abs().max())


def test_a_union_folder_loads_converts_and_runs_with_its_control_type(tmp_path, capsys):
    """diffusers' ControlNetUnionModel folder (xinsir's Union and ProMax are published so): loaded
    key for key, written back bitwise, refused in the layouts that have no place for its parts,
    and run from the command line with --control-type; a type it does not know is one line."""
    import numpy as np
    from PIL import Image

    from controlnet.cli import main
    from controlnet.formats import convert, load_controlnet, save_base

    base, ours, theirs = union_pair()
    theirs.save_pretrained(tmp_path / "union")
    loaded = load_controlnet(tmp_path / "union")
    assert isinstance(loaded, UnionControlNet) and loaded.num_mode == UNION.num_control_type
    want = ours.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    back = load_controlnet(convert(tmp_path / "union", tmp_path / "again", "diffusers")[0]).state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="a Union ControlNet is written as a diffusers folder"):
        convert(tmp_path / "union", tmp_path / "ours.safetensors", "controlnet")

    base_file = save_base(base, tmp_path / "xl.safetensors")[0]
    image = np.zeros((128, 128, 3), np.uint8)
    image[30:90, 20:100] = 255
    Image.fromarray(image).save(tmp_path / "cond.png")
    common = ["generate", "--base", str(base_file), "--controlnet", str(tmp_path / "union"), "--steps", "2"]
    common += ["--image", str(tmp_path / "cond.png"), "--resolution", "128", "--quiet"]
    assert main([*common, "--control-type", "1", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main([*common, "--control-type", "4", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "control_type" in err and "0-3" in err and len(err.splitlines()) == 1, err
    # two conditions of the one Union ControlNet: one pass, where a region mask has no place
    Image.fromarray(np.full((128, 128), 255, np.uint8)).save(tmp_path / "left.png")
    two = [*common, "--controlnet", str(tmp_path / "union"), "--image", str(tmp_path / "cond.png")]
    two += ["--control-type", "0", "--control-type", "2"]
    assert main([*two, "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    masked = [*two, "--region-mask", "none", "--region-mask", str(tmp_path / "left.png")]
    assert main([*masked, "--out", str(tmp_path / "masked")]) == 2
    err = capsys.readouterr().err.strip()
    assert "controls[1].region_mask" in err and "one pass" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "masked").exists()


def test_control_types_by_name_and_the_promax_file_as_xinsir_publishes_it(tmp_path, capsys):
    """A model of ProMax's size (8 kinds) saved as xinsir publishes it - ProMax's weights beside
    Union's config (6 kinds), and the weights file alone: both load with the kinds the tensors
    hold; inspect lists the kinds by name; --control-type takes a name (any case, any alias) as
    its number, bit for bit; the API and web app offer the names; an unknown name is one line
    naming the flag and the names."""
    import json
    import shutil

    import httpx
    import numpy as np
    from PIL import Image

    from controlnet.cli import main
    from controlnet.formats import inspect_checkpoint, load_controlnet, save_base
    from controlnet.serving.server import start
    from controlnet.serving.service import ServeConfig
    from controlnet.serving.units import control_types
    from serving import b64, decode

    promax = UnionConfig(8, 8, 2, 1, 8)
    base, ours, theirs = union_pair(union=promax)
    theirs.save_pretrained(tmp_path / "xinsir")
    config = json.loads((tmp_path / "xinsir" / "config.json").read_text())
    (tmp_path / "xinsir" / "config.json").write_text(json.dumps({**config, "num_control_type": 6}))
    alone = tmp_path / "xinsir" / "diffusion_pytorch_model_promax.safetensors"
    shutil.copyfile(tmp_path / "xinsir" / "diffusion_pytorch_model.safetensors", alone)
    want = ours.state_dict()
    for path in (tmp_path / "xinsir", alone):
        got = load_controlnet(path)
        assert isinstance(got, UnionControlNet) and got.union == promax, path
        assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items()), path
    names = ["openpose", "depth", "softedge", "canny", "normal", "segment", "tile", "repaint"]
    assert inspect_checkpoint(alone).control_types == names
    assert main(["inspect", str(alone)]) == 0
    assert "types:      0 openpose, 1 depth, 2 softedge, 3 canny" in capsys.readouterr().out

    base_file = save_base(base, tmp_path / "xl.safetensors")[0]
    image = np.zeros((128, 128, 3), np.uint8)
    image[30:90, 20:100] = 255
    Image.fromarray(image).save(tmp_path / "cond.png")
    common = ["generate", "--base", str(base_file), "--controlnet", str(alone), "--steps", "2", "--seed", "5"]
    common += ["--image", str(tmp_path / "cond.png"), "--resolution", "128", "--quiet"]
    pixels = {}
    for kind in ("1", "depth", "HED", "2"):
        assert main([*common, "--control-type", kind, "--out", str(tmp_path / kind)]) == 0, kind
        (png,) = (tmp_path / kind).glob("*_0.png")
        pixels[kind] = np.asarray(Image.open(png))
    assert np.array_equal(pixels["1"], pixels["depth"]) and np.array_equal(pixels["2"], pixels["HED"])
    assert not np.array_equal(pixels["1"], pixels["2"])  # the kind reaches the network
    sidecar = next((tmp_path / "depth").glob("*.json"))
    assert json.loads(sidecar.read_text())["request"]["controls"][0]["control_type"] == "depth"
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert main([*common, "--control-type", "dpeth", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "controls[0].control_type: 'dpeth'" in err and "openpose, depth" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()

    srv = start(ServeConfig(base=str(base_file), controlnets=(str(alone),)))
    try:
        with httpx.Client(base_url=srv.url, timeout=300) as client:
            (offered,) = client.get("/api/health").json()["control_types"].values()
            assert (
                offered == names and control_types(srv.service, next(iter(srv.service.controlnets))) == names
            )
            body = {"prompt": "", "steps": 2, "resolution": 128, "seed": 5}
            got = {}
            for kind in (1, "depth"):
                r = client.post(
                    "/api/generate", json={**body, "controls": [{"image": b64(image), "control_type": kind}]}
                )
                assert r.status_code == 200, r.text
                got[kind] = decode(r.json()["images"][0])
            assert np.array_equal(got[1], got["depth"])
            bad = client.post(
                "/api/generate", json={**body, "controls": [{"image": b64(image), "control_type": "x"}]}
            )
            assert bad.status_code == 400 and "control_type" in bad.json()["error"], bad.text
    finally:
        srv.stop()


def test_promax_repaint_inpaints_and_outpaints(tmp_path):
    """ProMax's repaint kind: the condition is the photo black where the mask repaints (the
    repaint annotator run with the request's mask); outpainting is the same on a wider canvas,
    the padding black in the condition and regenerated in the image, the photo kept."""
    import numpy as np
    from PIL import Image

    from controlnet.generation.check import check
    from controlnet.generation.generate import generate
    from controlnet.generation.request import ControlRequest, GenerationRequest

    base, ours, _ = union_pair(union=UnionConfig(8, 8, 2, 1, 8))
    rng = np.random.default_rng(0)
    photo = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
    hole = np.zeros((128, 128), np.uint8)
    hole[40:80, 50:100] = 255
    for name, a in (("photo", photo), ("hole", hole), ("keep", np.zeros_like(hole))):
        Image.fromarray(a).save(tmp_path / f"{name}.png")
    photo_png = str(tmp_path / "photo.png")
    control = ControlRequest(photo_png, preprocess="repaint", control_type="inpaint")
    common = dict(prompt="", controls=[control], init_image=photo_png, steps=2, seed=3, num_samples=1)

    inpaint = GenerationRequest(**common, mask=str(tmp_path / "hole.png"), resolution=128)
    got = generate(check(inpaint), base, [ours], progress=False)
    cond, painted = got.conditions[0], hole > 127
    assert cond[painted].max() == 0 and np.array_equal(cond[~painted], photo[~painted])

    wide = GenerationRequest(
        **common, mask=str(tmp_path / "keep.png"), width=192, height=128, resize_mode="fill"
    )
    got = generate(check(wide), base, [ours], progress=False)
    cond, image = got.conditions[0], got.images[0]
    assert cond.shape == (128, 192, 3) and cond[:, :32].max() == 0 and cond[:, 160:].max() == 0
    assert np.array_equal(cond[:, 32:160], photo)
    assert np.abs(image[:, 40:152].astype(int) - photo[:, 8:120]).max() <= 1  # the photo kept
    assert np.abs(image[:, :24].astype(int) - photo[:, :1]).mean() > 10  # the padding painted anew
