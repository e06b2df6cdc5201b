"""The generation job: requests, prompt settings, masks, sidecar replay, bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from controlnet import Family
from controlnet.annotators.utils import model_size
from controlnet.generation.check import check
from controlnet.generation.generate import generate, resolve_prompt
from controlnet.generation.request import PAPER_DEFAULT_PROMPT, ControlRequest, GenerationRequest
from controlnet.generation.sidecar import read_sidecar, verify_inputs, write_outputs
from tiny import make_base, make_controlnet


@pytest.fixture(scope="module")
def models():
    base = make_base(Family.SD1)
    return base, make_controlnet(base.unet, open_zero=True, seed=3)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    cond = np.zeros((64, 64, 3), np.uint8)
    cond[16:48, 16:48] = 255
    init = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :24] = 255  # regenerate the left part
    paths = {}
    for name, arr in {"cond": cond, "init": init, "mask": mask}.items():
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(arr).save(paths[name])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    paths["bad"] = str(bad)
    return paths


def request(files, **kw):
    kw.setdefault("controls", [ControlRequest(files["cond"])])
    kw = {"prompt": "a red circle", "resolution": 64, "steps": 3, "seed": 11, **kw}
    return GenerationRequest(**kw)


def test_same_seed_same_images_and_strength_zero_equals_no_control(models, files):
    base, cn = models
    a = generate(check(request(files, resolution=None)), base, [cn], progress=False)
    b = generate(check(request(files, resolution=None)), base, [cn], progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    zero = generate(
        check(request(files, resolution=None, controls=[ControlRequest(files["cond"], strength=0.0)])),
        base,
        [cn],
        progress=False,
    )
    none = generate(check(request(files, resolution=None, controls=[])), base, [], progress=False)
    assert np.array_equal(zero.images[0], none.images[0])
    assert not np.array_equal(a.images[0], none.images[0])
    # no resolution given: the model's native size (tiny UNet: 16 latents * 8)
    assert a.images[0].shape == (128, 128, 3) and a.conditions[0].shape == (128, 128, 3)


def test_a_region_mask_keeps_a_control_to_its_white_pixels(models, files, tmp_path):
    """A white region mask changes nothing, a black one is no control; the mask is fitted to the
    output like the condition (here: half the width, a different size from the output)."""
    base, cn = models
    masks = {}
    for name, value in (("white", 255), ("black", 0), ("left", None)):
        arr = np.zeros((32, 48), np.uint8)
        arr[:, :24] = 255
        masks[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(np.full((32, 48), value, np.uint8) if value is not None else arr).save(masks[name])

    def images(**kw):
        controls = [ControlRequest(files["cond"], **kw)] if kw.get("region_mask") != "off" else []
        return generate(
            check(request(files, controls=controls)), base, [cn] * len(controls), progress=False
        ).images[0]

    plain = images()
    assert np.array_equal(images(region_mask=masks["white"]), plain)
    assert np.array_equal(images(region_mask=masks["black"]), images(region_mask="off"))
    left = images(region_mask=masks["left"])
    assert not np.array_equal(left, plain) and not np.array_equal(left, images(region_mask="off"))


def test_batches_use_consecutive_seeds(models, files):
    base, cn = models
    res = generate(check(request(files, num_samples=3)), base, [cn], progress=False)
    assert res.seeds == [11, 12, 13] and len(res.images) == 3
    assert not np.array_equal(res.images[0], res.images[1])


def test_prompt_settings(files):
    r = request(files)
    assert resolve_prompt(r) == "a red circle, best quality, extremely detailed"
    assert resolve_prompt(request(files, prompt_setting="none")) == ""
    assert resolve_prompt(request(files, prompt_setting="default", added_prompt="")) == PAPER_DEFAULT_PROMPT
    auto = request(files, prompt_setting="auto", captioner="folder", added_prompt="")
    assert resolve_prompt(auto, caption=lambda img: f"a {img.shape[1]}px picture") == "a 64px picture"
    with pytest.raises(ValueError, match="needs a captioner folder"):
        check(request(files, prompt_setting="auto"))


def test_missing_captioner_weights_is_a_clear_error(tmp_path):
    from controlnet.generation.captioner import Captioner

    with pytest.raises(FileNotFoundError, match=r"has no config\.json: download a BLIP captioning model"):
        Captioner(tmp_path)


def test_masked_editing_keeps_the_unmasked_region(models, files):
    base, cn = models
    req = request(files, init_image=files["init"], mask=files["mask"], overlay=False)
    res = generate(check(req), base, [cn], progress=False)
    init = np.array(Image.open(files["init"]))
    pixels = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1
    source = base.encode_images(pixels, torch.Generator().manual_seed(11))
    # the mask covers pixel columns 0..23 = latent columns 0..2; the rest follows the source exactly
    assert torch.equal(res.latents[..., 3:], source[..., 3:])
    assert not torch.allclose(res.latents[..., :3], source[..., :3])

    # with the default paste-back, every kept pixel is the source's; the edit stays in the mask
    pasted = generate(
        check(request(files, init_image=files["init"], mask=files["mask"])), base, [cn], progress=False
    )
    assert np.array_equal(pasted.images[0][:, 24:], init[:, 24:])
    assert not np.array_equal(pasted.images[0][:, :20], init[:, :20])
    assert np.array_equal(pasted.images[0][:, :20], res.images[0][:, :20])  # inside: the generated pixels


def test_img2img_with_low_denoise_stays_near_the_init(models, files):
    base, cn = models
    near = generate(
        check(request(files, init_image=files["init"], denoise=0.2, steps=10)), base, [cn], progress=False
    )
    far = generate(
        check(request(files, init_image=files["init"], denoise=1.0, steps=10)), base, [cn], progress=False
    )
    init = np.asarray(Image.open(files["init"])).astype(float)
    assert np.abs(near.images[0] - init).mean() < np.abs(far.images[0] - init).mean()


def test_sidecar_replay_is_bit_identical(models, files, tmp_path):
    base, cn = models
    req = request(files, num_samples=2)
    req.seed = None  # drawn, then recorded
    first = generate(check(req), base, [cn], progress=False)
    sidecar = write_outputs(first, tmp_path / "out")
    record = read_sidecar(sidecar)
    assert record.request.seed == first.seeds[0]
    assert {"controls[0].image"} <= set(record.inputs)
    data = json.loads(sidecar.read_text())
    assert data["prompt"] == first.prompt and len(data["outputs"]["images"]) == 2
    verify_inputs(record)
    again = generate(check(record.request), base, [cn], progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(first.images, again.images))
    saved = np.asarray(Image.open(sidecar.parent / data["outputs"]["images"][1]["file"]))
    assert np.array_equal(saved, again.images[1])
    assert (sidecar.parent / data["outputs"]["grid"]).is_file()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(files["cond"])  # the input changes
    with pytest.raises(ValueError, match=r"controls\[0\].image .* has changed"):
        verify_inputs(read_sidecar(sidecar))


def _hints(cn):
    """Record every condition tensor the ControlNet's hint encoder reads."""
    seen = []
    handle = cn.controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    return seen, handle


def test_inpainting_map_reaches_the_model_with_minus_one_on_masked_pixels(models, files, tmp_path):
    """The v1.1 inpaint model reads -1 where pixels are to be repainted. A ready RGBA map (as
    `controlnet preprocess inpaint` writes it) keeps its alpha; the inpaint annotator run inside the
    generation reads the request's mask."""
    from controlnet.annotators.inpaint import inpaint
    from controlnet.imageio import write_image

    base, cn = models
    init = np.array(Image.open(files["init"]))
    masked = np.asarray(Image.open(files["mask"])) > 127  # columns 0..23
    write_image(tmp_path / "inpaint.png", inpaint(init, masked))
    seen, handle = _hints(cn)
    try:
        ready_map = ControlRequest(str(tmp_path / "inpaint.png"))
        ready = generate(check(request(files, controls=[ready_map])), base, [cn], progress=False)
        annotated = generate(
            check(
                request(
                    files,
                    controls=[ControlRequest(files["init"], preprocess="inpaint")],
                    init_image=files["init"],
                    mask=files["mask"],
                )
            ),
            base,
            [cn],
            progress=False,
        )
    finally:
        handle.remove()
    for hint in (seen[0], seen[-1]):
        assert hint.shape == (1, 3, 64, 64)
        assert torch.all(hint[..., :24] == -1)  # the masked columns, every channel
        kept = torch.from_numpy(init[:, 24:]).permute(2, 0, 1)[None].float() / 255
        assert torch.allclose(hint[..., 24:], kept)
    assert np.array_equal(ready.conditions[0][:, :24], np.zeros((64, 24, 3), np.uint8))  # shown black
    assert annotated.conditions[0].shape == (64, 64, 3)
    # without a mask the annotator has nothing to read: refused before any model work
    with pytest.raises(ValueError, match="control 0: annotator inpaint needs a mask"):
        check(request(files, controls=[ControlRequest(files["init"], preprocess="inpaint")]))


def test_resize_modes_fit_every_image_of_the_request_alike(models, tmp_path):
    """A 32x64 picture on a 64x64 output: each mode gives the map the library's fit makes; an
    annotator runs on the picture alone, its map padded after (no edges at the padding); with fill
    and a mask, the padding is regenerated and the picture kept pixel for pixel (outpainting)."""
    from controlnet.annotators import annotate, fit_to

    base, cn = models
    rng = np.random.default_rng(5)
    wide = np.full((32, 64, 3), 128, np.uint8)
    wide[8:24, 24:40] = 255
    photo = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    keep_all = np.zeros((32, 64), np.uint8)  # regenerate nothing of the picture itself
    paths = {}
    for name, arr in {"wide": wide, "photo": photo, "keep": keep_all}.items():
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(arr).save(paths[name])

    def run(mode, **kw):
        kw.setdefault("controls", [ControlRequest(paths["wide"])])
        req = GenerationRequest(prompt="x", steps=2, seed=3, width=64, height=64, resize_mode=mode, **kw)
        return generate(check(req), base, [cn] * len(kw["controls"]), progress=False)

    for mode in ("stretch", "crop", "fill"):
        assert np.array_equal(run(mode).conditions[0], fit_to(wide, (64, 64), mode))
    canny = run("fill", controls=[ControlRequest(paths["wide"], preprocess="canny")]).conditions[0]
    assert np.array_equal(canny[16:48], annotate("canny", wide))
    assert not canny[:16].any() and not canny[48:].any()

    out = run("fill", init_image=paths["photo"], mask=paths["keep"], denoise=1.0).images[0]
    assert np.array_equal(out[16:48], photo)  # the picture, every pixel
    padding = fit_to(photo, (64, 64), "fill")[:16]  # what the init image holds there
    assert np.abs(out[:16].astype(int) - padding).mean() > 10  # generated anew

    with pytest.raises(ValueError, match="unknown resize mode 'zoom'; expected one of: stretch, crop, fill"):
        check(GenerationRequest(resize_mode="zoom"))
    # sidecars written before resize modes existed replay as they ran: stretched
    assert GenerationRequest.from_dict({"prompt": "x"}).resize_mode == "stretch"


def test_output_size_keeps_aspect_on_multiples_of_64():
    assert model_size(480, 640, 512) == (512, 704)
    assert model_size(512, 512, 512) == (512, 512)
    assert model_size(100, 1000, 128) == (128, 1280)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"sampler": "plms"}, "unknown sampler 'plms'"),
        ({"timestep_spacing": "sgm"}, "unknown timestep spacing 'sgm'; expected one of: default, leading"),
        (
            {"sampler": "dpmpp-2m-karras", "timestep_spacing": "trailing"},
            "timestep_spacing 'trailing': the dpmpp-2m-karras sampler places its steps by Karras'",
        ),
        ({"sampler": "lcm", "steps": 51}, "steps: the lcm sampler takes at most 50 steps .*, got 51"),
        (
            {"sampler": "lcm", "hires_scale": 2.0, "hires_steps": 60},
            "hires_steps: the lcm sampler takes at most 50 steps .*, got 60",
        ),
        ({"controls": "neg"}, "control 0: strength must be >= 0"),
        ({"controls": "window"}, "control 0: start 0.9 is after end 0.1"),
        ({"controls": "mode"}, "unknown control 0 mode 'loud'"),
        ({"controls": "bad"}, r"cannot read .*notes.png as an image"),
        ({"controls": "missing"}, r"no such image: .*nothing.png"),
        ({"controls": "region"}, r"control 0: region mask: no such image: .*nowhere.png"),
        ({"mask": "mask"}, "a mask needs an init image"),
        ({"mask": "small"}, r"mask .* is 32x32 but the init image .* is 64x64"),
        ({"denoise": 0.0}, r"denoise must be in \(0, 1\]"),
        ({"eta": 1.5}, r"eta must be in \[0, 1\], got 1.5"),
        ({"clip_skip": 0}, "clip_skip must be >= 1"),
        ({"clip_skip": 3}, "clip_skip must be between 1 and the text encoder's 2 layers, got 3"),
        ({"prompt_syntax": "a1111"}, "unknown prompt syntax 'a1111'; expected one of: weighted, plain"),
        ({"hires_scale": 5.0}, "hires_scale must be between 1 [(]off[)] and 4, got 5.0"),
        ({"hires_scale": 0.5}, "hires_scale must be between 1 [(]off[)] and 4, got 0.5"),
        ({"hires_scale": 2.0, "hires_denoise": 0.0}, r"hires_denoise must be in \(0, 1\]"),
        ({"hires_scale": 2.0, "hires_steps": 0}, "hires_steps must be >= 1"),
        ({"hires_upscaler": "esrgan"}, "unknown hires upscaler 'esrgan'; expected one of: latent, image"),
        ({"hires_scale": 2.0, "init_image": "init"}, "hires_scale is for text-to-image generations"),
        ({"hires_scale": 4.0, "width": 1600, "height": 64}, "would make 6400x256 images; .* within 4096"),
    ],
)
def test_bad_requests_fail_before_model_work(models, files, tmp_path, change, message):
    base, cn = models
    kw = dict(change)
    if kw.get("controls") == "neg":
        kw["controls"] = [ControlRequest(files["cond"], strength=-1)]
    elif kw.get("controls") == "window":
        kw["controls"] = [ControlRequest(files["cond"], start=0.9, end=0.1)]
    elif kw.get("controls") == "mode":
        kw["controls"] = [ControlRequest(files["cond"], mode="loud")]
    elif kw.get("controls") == "bad":
        kw["controls"] = [ControlRequest(files["bad"])]
    elif kw.get("controls") == "missing":
        kw["controls"] = [ControlRequest(str(tmp_path / "nothing.png"))]
    elif kw.get("controls") == "region":
        kw["controls"] = [ControlRequest(files["cond"], region_mask=str(tmp_path / "nowhere.png"))]
    if kw.get("mask") == "small":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
        kw.update(mask=str(tmp_path / "small.png"), init_image=files["init"])
    elif kw.get("mask") == "mask":
        kw["mask"] = files["mask"]
    if kw.get("init_image") == "init":
        kw["init_image"] = files["init"]
    calls = []
    handle = base.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))  # whole or in halves
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        generate(check(request(files, **kw)), base, [cn], progress=False)
    handle.remove()
    assert calls == []


def test_a_generation_reads_the_whole_long_prompt(models, files, tmp_path):
    base, cn = models
    long = ", ".join(f"a photo number {i}" for i in range(30))  # 3 chunks of at most 75 tokens
    req = request(files, prompt=long, steps=2)
    to_k = next(m for name, m in base.unet.named_modules() if name.endswith("attn2.to_k"))
    seen = []  # the context the UNet's first cross-attention reads
    handle = to_k.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[:2])))
    try:
        weighted = generate(check(req), base, [cn], progress=False)
        req.prompt_syntax = "plain"
        with pytest.warns(UserWarning, match="is cut off"):
            plain = generate(check(req), base, [cn], progress=False)
    finally:
        handle.remove()
    # the CFG batch (prompt and negative, brought to one length): all 3 chunks, or the one window
    assert set(seen) == {(2, 77 * 3), (2, 77)}
    assert not np.array_equal(weighted.images[0], plain.images[0])

    # the sidecar replays with the syntax it ran with; one written before the field: plain
    sidecar = write_outputs(weighted, tmp_path / "out")
    assert read_sidecar(sidecar).request.prompt_syntax == "weighted"
    data = json.loads(sidecar.read_text())
    del data["request"]["prompt_syntax"]
    sidecar.write_text(json.dumps(data))
    assert read_sidecar(sidecar).request.prompt_syntax == "plain"


def test_controlnet_of_another_family_is_refused_before_model_work(models, files):
    base, _ = models
    sd2 = make_controlnet(make_base(Family.SD2).unet)
    sd2.unet_config["cross_attention_dim"] = 1024  # as a real SD2 ControlNet would record
    with pytest.raises(ValueError, match=r"control 0's ControlNet .*SD2.* does not fit the base model"):
        generate(check(request(files)), base, [sd2], progress=False)


def test_hires_fix_refines_an_enlarged_first_pass_with_controls_at_the_larger_size(models, files):
    base, cn = models
    seen, handle = _hints(cn)
    latent_sizes = []
    hook = base.unet.conv_in.register_forward_pre_hook(
        lambda m, a: latent_sizes.append(tuple(a[0].shape[-2:]))
    )
    calls = []
    res = generate(
        check(request(files, hires_scale=2.0, steps=4, hires_steps=6, hires_denoise=0.5, guidance=1.0)),
        base,
        [cn],
        progress=False,
        callback=lambda i, total: calls.append((i, total)),
    )
    handle.remove()
    hook.remove()
    # first pass: 4 steps at 64 px (8 latents); second: the last round(6 * 0.5) = 3 of 6 at 128 px
    assert latent_sizes == [(8, 8)] * 4 + [(16, 16)] * 3
    assert [tuple(h.shape[-2:]) for h in seen] == [(64, 64), (128, 128)]  # encoded once per pass
    assert calls == [(i, 7) for i in range(1, 8)]  # one count over both passes
    assert res.images[0].shape == (128, 128, 3) and res.conditions[0].shape == (128, 128, 3)
    assert res.latents.shape[-2:] == (16, 16)


def test_hires_pass_has_its_own_progress_bar(models, files, capsys):
    base, cn = models
    generate(check(request(files, hires_scale=2.0, steps=2)), base, [cn], progress=True)
    err = capsys.readouterr().err
    assert "denoising: " in err and "hires pass: " in err


@pytest.mark.parametrize("upscaler", ["latent", "image"])
def test_hires_fix_starts_from_the_enlarged_first_pass(models, files, upscaler):
    """The second pass is img2img from the enlarged first pass: a light touch stays near the
    enlargement alone, a full denoise draws something else."""
    base, cn = models
    first = generate(check(request(files, steps=10)), base, [cn], progress=False)
    if upscaler == "latent":
        latents = F.interpolate(first.latents, size=(16, 16), mode="bilinear")
    else:  # the pixels enlarged, then back to latents (the test model's VAE is random: not an identity)
        pixels = F.interpolate(base.decode_latents(first.latents), size=(128, 128), mode="bicubic")
        latents = base.encode_images(pixels.clamp(-1, 1), torch.Generator().manual_seed(11))
    enlarged = ((base.decode_latents(latents)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)

    def hires(strength):
        req = request(files, steps=10, hires_scale=2.0, hires_denoise=strength, hires_upscaler=upscaler)
        return generate(check(req), base, [cn], progress=False).images[0].astype(float)

    light, full = hires(0.1), hires(1.0)
    assert light.shape == full.shape == (128, 128, 3)
    assert np.abs(light - enlarged).mean() < 0.5 * np.abs(full - enlarged).mean()


@pytest.mark.parametrize(
    "kind",
    [
        {},
        {"hires_scale": 2.0},
        {"hires_scale": 2.0, "hires_upscaler": "image"},
        {"hires_scale": 2.0, "hires_upscaler": "image", "vae_tiling": True},
        {"init_image": "init", "denoise": 0.5},
    ],
)
def test_a_batch_sample_is_the_single_generation_of_its_seed(models, files, kind):
    """Sample i of seed s is the image a single generation of seed s + i makes (up to the last
    bit of float arithmetic that batched CPU kernels order differently: 1 level), in text to
    image, both hires upscalers (the image one with the VAE in tiles too) and img2img (whose VAE
    posterior draw is the sample's too)."""
    base, cn = models
    kind = {k: files[v] if k == "init_image" else v for k, v in kind.items()}
    batch = generate(check(request(files, num_samples=2, **kind)), base, [cn], progress=False)
    alone = generate(check(request(files, seed=12, **kind)), base, [cn], progress=False)
    assert batch.seeds == [11, 12]
    assert np.abs(batch.images[1].astype(int) - alone.images[0]).max() <= 1


def test_hires_sidecar_replays_bit_for_bit_and_older_sidecars_read_as_off(models, files, tmp_path):
    base, cn = models
    first = generate(
        check(request(files, hires_scale=1.5, hires_upscaler="image", hires_steps=4)),
        base,
        [cn],
        progress=False,
    )
    sidecar = write_outputs(first, tmp_path / "out")
    again = generate(check(read_sidecar(sidecar).request), base, [cn], progress=False)
    assert first.images[0].shape == (128, 128, 3)  # 64 * 1.5 = 96, to the nearest multiple of 64 (halves up)
    assert np.array_equal(first.images[0], again.images[0])
    data = json.loads(sidecar.read_text())
    for key in ("hires_scale", "hires_denoise", "hires_steps", "hires_upscaler"):
        del data["request"][key]  # as written before the hires fix existed
    sidecar.write_text(json.dumps(data))
    old = read_sidecar(sidecar).request
    assert old.hires_scale == 1.0
    assert generate(check(old), base, [cn], progress=False).images[0].shape == (64, 64, 3)


def test_a1111_lora_tags_in_prompts_are_refused_with_where_loras_go():
    """A `<lora:name:weight>` tag would be read as words; the error says to pass the file."""
    with pytest.raises(ValueError, match=r"prompt: '<lora:ink:0\.6>' is the A1111 .* --lora FILE:0\.6"):
        check(GenerationRequest(prompt="a castle, <lora:ink:0.6>"))
    with pytest.raises(ValueError, match=r"negative_prompt: '<lyco:blur>' is the A1111"):
        check(GenerationRequest(negative_prompt="<lyco:blur>, lowres"))
    check(GenerationRequest(prompt="a <red> car, (sharp:1.2)"))  # other angle brackets are words
