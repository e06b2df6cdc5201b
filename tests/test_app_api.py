"""The HTTP API against a real server on a free port: results match the library, every bad request
gets a clear error (never a 500), concurrent requests are queued and all answered."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from controlnet.annotators import annotate
from controlnet.bundled import BUNDLED_SETTINGS
from controlnet.generation.check import check
from controlnet.generation.pipeline import run
from controlnet.generation.request import ControlRequest, GenerationRequest
from controlnet.imageio import read_image
from controlnet.serving.api import SERVER_FIELDS, ControlBody, GenerateBody
from controlnet.serving.limits import Limits
from controlnet.serving.server import start
from controlnet.serving.service import ServeConfig, Service
from serving import b64, bomb_png, decode, model_files, png_bytes, serve_tiny, square

LIMITS = Limits(max_megapixels=0.1, max_upload_megapixels=0.1, max_upload_mb=1, max_steps=5, max_samples=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = serve_tiny(tmp_path_factory.mktemp("models"), LIMITS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def gen(**kw):
    """A small generate body: one Canny-preprocessed control, 2 steps at 64 px."""
    body = {"prompt": "a square", "steps": 2, "resolution": 64, "seed": 7}
    body["controls"] = [{"image": b64(square()), "preprocess": "canny"}]
    return {**body, **kw}


def test_health_lists_models_and_limits(client, server):
    from controlnet.serving.units import control_types

    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["controlnets"] == ["edges", "second"]
    assert h["control_types"] == {"edges": None, "second": None}  # ControlNets of one kind each
    assert control_types(server.service, "edges") == ["none"]  # the web app's control-type choice
    assert h["limits"]["max_steps"] == 5 and h["native_size"] == 128


def test_annotators_describe_the_registry(client):
    by_name = {a["name"]: a for a in client.get("/api/annotators").json()}
    canny = {p["name"]: p for p in by_name["canny"]["params"]}
    assert canny["low_threshold"] == {**canny["low_threshold"], "type": "int", "default": 100, "maximum": 255}
    assert by_name["inpaint"]["inputs"] == ["mask"]


def test_generate_returns_what_the_library_makes(client, server, tmp_path):
    r = client.post("/api/generate", json=gen(num_samples=2))
    assert r.status_code == 200, r.text
    out = r.json()
    images = [decode(i) for i in out["images"]]
    assert [i.shape for i in images] == [(64, 64, 3)] * 2 and out["seeds"] == [7, 8]
    assert (
        out["sidecar"]["request"]["seed"] == 7
        and out["sidecar"]["request"]["controls"][0]["preprocess"] == "canny"
    )
    np.testing.assert_array_equal(decode(out["conditions"][0]), annotate("canny", square()))
    # the same request through the library, from files: bit-identical images
    base, cns = server.files
    (tmp_path / "sq.png").write_bytes(png_bytes(square()))
    control = ControlRequest(image=str(tmp_path / "sq.png"), controlnet=cns[0], preprocess="canny")
    request = GenerationRequest(
        prompt="a square", controls=[control], base=base, steps=2, resolution=64, seed=7, num_samples=2
    )
    result, _ = run(check(request), progress=False)
    for ours, lib in zip(images, result.images):
        np.testing.assert_array_equal(ours, lib)


def test_generate_with_the_hires_fix(client):
    r = client.post("/api/generate", json=gen(hires_scale=2, hires_denoise=0.5))
    assert r.status_code == 200, r.text
    out = r.json()
    assert decode(out["images"][0]).shape == (128, 128, 3)
    assert decode(out["conditions"][0]).shape == (128, 128, 3)  # detected again at the larger size
    assert out["sidecar"]["request"]["hires_scale"] == 2


def test_vae_tiling_is_a_request_field_the_library_reads_alike(client, server, tmp_path):
    r = client.post("/api/generate", json=gen(resolution=128, vae_tiling=True))  # the VAE's tile: 64 px
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["sidecar"]["request"]["vae_tiling"] is True and "offload" in out["sidecar"]["request"]
    base, cns = server.files
    (tmp_path / "sq.png").write_bytes(png_bytes(square()))
    control = ControlRequest(image=str(tmp_path / "sq.png"), controlnet=cns[0], preprocess="canny")
    request = GenerationRequest(
        prompt="a square", controls=[control], base=base, steps=2, resolution=128, seed=7, vae_tiling=True
    )
    np.testing.assert_array_equal(decode(out["images"][0]), run(check(request), progress=False)[0].images[0])
    plain = client.post("/api/generate", json=gen(resolution=128)).json()
    assert not np.array_equal(decode(plain["images"][0]), decode(out["images"][0]))


def test_generate_with_two_controls_and_a_named_controlnet(client):
    body = gen(
        controls=[{"image": b64(square())}, {"image": b64(square()), "controlnet": "second", "end": 0.5}]
    )
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    # the sidecar names each ControlNet as clients do, by the server's name for it
    assert [c["controlnet"] for c in r.json()["sidecar"]["request"]["controls"]] == ["edges", "second"]


def test_masked_editing_keeps_the_unmasked_pixels(client):
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # regenerate the right half
    body = gen(init_image=b64(init), mask=b64(mask), denoise=0.8, mask_blur=0)
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0])
    np.testing.assert_array_equal(out[:, :32], init[:, :32])
    assert not np.array_equal(out[:, 32:], init[:, 32:])


def test_a_control_region_mask_is_an_upload_like_the_others(client, server, tmp_path):
    """``region_mask`` is stored as a mask and gives what the library gives with the same file."""
    region = np.zeros((64, 64), np.uint8)
    region[:, :32] = 255
    r = client.post(
        "/api/generate", json=gen(controls=[{"image": b64(square()), "region_mask": b64(region)}])
    )
    assert r.status_code == 200, r.text
    base, cns = server.files
    (tmp_path / "sq.png").write_bytes(png_bytes(square()))
    (tmp_path / "region.png").write_bytes(png_bytes(region))
    control = ControlRequest(
        image=str(tmp_path / "sq.png"), controlnet=cns[0], region_mask=str(tmp_path / "region.png")
    )
    request = GenerationRequest(
        prompt="a square", controls=[control], base=base, steps=2, resolution=64, seed=7
    )
    np.testing.assert_array_equal(
        decode(r.json()["images"][0]), run(check(request), progress=False)[0].images[0]
    )
    r = client.post(
        "/api/generate", json=gen(controls=[{"image": b64(square()), "region_mask": b64(b"GIF89a x")}])
    )
    assert r.status_code == 400 and "controls[0].region_mask: not" in r.json()["error"], r.text


def test_preprocess_gives_the_annotators_map(client):
    r = client.post(
        "/api/preprocess",
        json={"annotator": "canny", "image": b64(square()), "params": {"low_threshold": 50}},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.json()["image"]), annotate("canny", square(), low_threshold=50))
    # inpaint takes a mask (as a data URL here) and keeps it in the alpha channel
    mask = np.zeros((64, 64), np.uint8)
    mask[:8] = 255
    url = "data:image/png;base64," + b64(mask)
    r = client.post("/api/preprocess", json={"annotator": "inpaint", "image": b64(square()), "mask": url})
    assert r.status_code == 200, r.text
    rgba = decode(r.json()["image"])
    assert rgba.shape == (64, 64, 4) and (rgba[:8, :, 3] == 0).all() and (rgba[8:, :, 3] == 255).all()


def test_an_inpainting_map_from_preprocess_is_fed_back_with_its_mask(client, server, tmp_path):
    """The RGBA map /api/preprocess returns, sent back as a ready map, is what the library makes of
    the same file (its alpha-0 pixels read as -1), not the map flattened over white."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :24] = 255
    body = {"annotator": "inpaint", "image": b64(square()), "mask": b64(mask)}
    pre = client.post("/api/preprocess", json=body)
    assert pre.status_code == 200, pre.text
    rgba = decode(pre.json()["image"])
    with_alpha = client.post("/api/generate", json=gen(controls=[{"image": b64(rgba)}]))
    flattened = client.post("/api/generate", json=gen(controls=[{"image": b64(rgba[..., :3])}]))
    assert with_alpha.status_code == flattened.status_code == 200, (with_alpha.text, flattened.text)
    ours = decode(with_alpha.json()["images"][0])
    assert not np.array_equal(ours, decode(flattened.json()["images"][0]))
    base, cns = server.files
    (tmp_path / "map.png").write_bytes(png_bytes(rgba))
    request = GenerationRequest(
        prompt="a square",
        controls=[ControlRequest(image=str(tmp_path / "map.png"), controlnet=cns[0])],
        base=base,
        steps=2,
        resolution=64,
        seed=7,
    )
    result, _ = run(check(request), progress=False)
    np.testing.assert_array_equal(ours, result.images[0])


TRUNCATED_PNG = png_bytes(np.full((64, 64, 3), 7, np.uint8))[:60]
BIG = b64(np.zeros((400, 400, 3), np.uint8))  # 0.16 megapixels, over the test server's 0.1

BAD_GENERATE = [
    # (what, body changes, status, words the error must contain)
    (
        "not an image",
        {"controls": [{"image": b64(b"hello, not a picture")}]},
        400,
        ["controls[0].image", "not an image"],
    ),
    ("corrupt png", {"controls": [{"image": b64(TRUNCATED_PNG)}]}, 400, ["controls[0].image", "readable"]),
    ("not base64", {"controls": [{"image": "%%%"}]}, 400, ["controls[0].image", "base64"]),
    ("huge image", {"controls": [{"image": BIG}]}, 413, ["controls[0].image", "400x400", "0.1 megapixels"]),
    ("bomb", {"controls": [{"image": b64(bomb_png())}]}, 413, ["controls[0].image", "megapixels"]),
    ("huge init", {"init_image": BIG}, 413, ["init_image", "0.1 megapixels"]),
    ("steps", {"steps": 6}, 400, ["steps=6", "limit of 5"]),
    ("samples", {"num_samples": 3}, 400, ["num_samples=3", "limit of 2"]),
    ("output size", {"resolution": 384}, 400, ["384x384", "0.1 megapixels", "resolution"]),
    ("hires size", {"resolution": 192, "hires_scale": 2}, 400, ["384x384", "0.1 megapixels", "hires_scale"]),
    ("hires steps", {"hires_scale": 2, "hires_steps": 6}, 400, ["hires_steps=6", "limit of 5"]),
    ("hires scale", {"hires_scale": 8}, 400, ["hires_scale must be between 1 (off) and 4"]),
    (
        "unknown annotator",
        {"controls": [{"image": b64(square()), "preprocess": "nope"}]},
        400,
        ["annotator 'nope'"],
    ),
    ("unknown sampler", {"sampler": "magic"}, 400, ["sampler 'magic'", "ddim"]),
    ("unknown mode", {"controls": [{"image": b64(square()), "mode": "loud"}]}, 400, ["mode", "balanced"]),
    (
        "bad param",
        {"controls": [{"image": b64(square()), "preprocess": "canny", "params": {"low_threshold": 999}}]},
        400,
        ["low_threshold=999", "[1, 255]"],
    ),
    (
        "unknown param",
        {"controls": [{"image": b64(square()), "preprocess": "canny", "params": {"sigma": 1}}]},
        400,
        ["no param 'sigma'"],
    ),
    (
        "unknown controlnet",
        {"controls": [{"image": b64(square()), "controlnet": "x"}]},
        400,
        ["ControlNet 'x'", "edges"],
    ),
    (
        "window",
        {"controls": [{"image": b64(square()), "start": 0.8, "end": 0.2}]},
        400,
        ["start 0.8 is after end 0.2"],
    ),
    ("mask alone", {"mask": b64(square())}, 400, ["mask needs an init image"]),
    ("seed", {"seed": -5}, 400, ["seed must be between 0"]),
    ("prompt syntax", {"prompt_syntax": "a1111"}, 400, ["unknown prompt syntax 'a1111'", "weighted, plain"]),
    ("eta", {"eta": -1}, 400, ["eta must be in [0, 1]"]),
    ("clip skip", {"clip_skip": 5}, 400, ["clip_skip must be between 1 and the text encoder's 2 layers"]),
    (
        "mask size",
        {"init_image": b64(square()), "mask": b64(square(32)[..., 0])},
        400,
        ["mask mask is 32x32 but the init image init_image is 64x64"],
    ),
    ("missing field", {"controls": [{"preprocess": "canny"}]}, 422, ["controls[0].image", "required"]),
    ("wrong type", {"steps": "many"}, 422, ["steps", "integer"]),
    ("unknown field", {"colour": "red"}, 422, ["colour: unknown field"]),
    ("server field", {"device": "cuda"}, 422, ["device", "set by the server"]),
    ("four controls", {"controls": [{"image": b64(square())}] * 4}, 400, ["4 controls", "limit of 3"]),
]


@pytest.mark.parametrize("what, change, status, words", BAD_GENERATE, ids=[b[0] for b in BAD_GENERATE])
def test_bad_generate_requests_get_clear_errors(client, what, change, status, words):
    r = client.post("/api/generate", json=gen(**change))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for w in words:
        assert w in error, (w, error)
    assert "/tmp" not in error and "uploads" not in error  # no server paths in messages


def test_bad_bodies(client, server):
    assert client.post("/api/generate", content=b"{nope").json() == {"error": "the request body is not JSON"}
    assert client.post("/api/generate", json=[1, 2]).status_code == 422
    big = b'{"prompt": "' + b"x" * 8_000_000 + b'"}'
    r = client.post("/api/generate", content=big)
    assert r.status_code == 413 and "request body is over the limit" in r.json()["error"]
    assert client.get("/api/health").json()["queue"]["failed"] == 0  # none of these reached the worker


BAD_PREPROCESS = [
    ({"annotator": "nope"}, 400, "unknown annotator 'nope'"),
    ({"annotator": "canny", "params": {"high_threshold": 0}}, 400, "high_threshold=0"),
    ({"annotator": "canny", "mask": b64(square())}, 400, "takes no mask"),
    ({"annotator": "inpaint"}, 400, "needs a mask"),
    ({"annotator": "canny", "image": b64(b"GIF89a broken")}, 400, "image: not"),
    ({"annotator": "canny", "resolution": 384}, 400, "0.1 megapixels"),
    (
        {"annotator": "depth_midas", "params": {"weights": "missing-folder"}},
        400,
        "offers no annotator weights",
    ),
    ({"image": b64(square())}, 422, "annotator: Field required"),
]


@pytest.mark.parametrize("change, status, words", BAD_PREPROCESS)
def test_bad_preprocess_requests_get_clear_errors(client, change, status, words):
    r = client.post("/api/preprocess", json={"image": b64(square()), **change})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_contract_matches_the_generation_request():
    """Every request field a client may set is in the API body, and nothing else."""
    client_fields = {f.name for f in fields(GenerationRequest)} - SERVER_FIELDS
    assert set(GenerateBody.model_fields) == client_fields
    assert set(ControlBody.model_fields) == {f.name for f in fields(ControlRequest)}
    assert GenerateBody().steps == GenerationRequest().steps


def test_eight_concurrent_generations_are_queued_and_all_answered(client, server):
    """Hold the worker, send 8 requests at once, see all 8 wait, release: all succeed, one at a time."""
    before = client.get("/api/health").json()["queue"]
    release = threading.Event()
    hold = threading.Thread(target=server.service.run_exclusive, args=(lambda: release.wait(60),))
    hold.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(
                    lambda s: httpx.post(f"{server.url}/api/generate", json=gen(seed=s), timeout=120), s
                )
                for s in range(8)
            ]
            for _ in range(400):
                if client.get("/api/health").json()["queue"]["waiting"] == 8:
                    break
                threading.Event().wait(0.05)
            assert client.get("/api/health").json()["queue"]["waiting"] == 8
            release.set()
            responses = [f.result() for f in futures]
    finally:
        release.set()
        hold.join()
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["seeds"] for r in responses] == [[s] for s in range(8)]
    assert all(decode(r.json()["images"][0]).shape == (64, 64, 3) for r in responses)
    after = client.get("/api/health").json()["queue"]
    assert after["done"] - before["done"] == 8 and after["waiting"] == after["running"] == 0
    assert after["max_concurrent"] == 1  # the single worker serialised every generation


def test_a_full_queue_answers_busy(tmp_path):
    base, cns = model_files(tmp_path)
    limits = Limits(max_queue=1, max_steps=5)
    with start(ServeConfig(base=base, controlnets=(cns[0],), limits=limits)) as srv:
        release = threading.Event()
        hold = threading.Thread(target=srv.service.run_exclusive, args=(lambda: release.wait(60),))
        hold.start()
        try:
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(httpx.post, f"{srv.url}/api/generate", json=gen(), timeout=120)
                while httpx.get(f"{srv.url}/api/health").json()["queue"]["waiting"] < 1:
                    threading.Event().wait(0.05)
                r = httpx.post(f"{srv.url}/api/generate", json=gen(), timeout=120)
                assert r.status_code == 503 and "busy" in r.json()["error"]
                release.set()
                assert first.result().status_code == 200
        finally:
            release.set()
            hold.join()
        assert httpx.get(f"{srv.url}/api/health").status_code == 200


def test_a_server_of_the_bundled_transformer_stack_serves_it_at_its_side(tmp_path):
    """--family flux: the bundled flux-tiny base (here with a fresh ControlNet of its architecture:
    the trained one ships later) serves at the side it was made for, with its family's sampler."""
    from controlnet.bundled import BUNDLED_MODELS, bundled_path
    from controlnet.formats import load_base, save_controlnet
    from controlnet.training.recipes import architecture

    base = load_base(bundled_path(BUNDLED_MODELS["flux"].base))
    save_controlnet(base.new_controlnet(architecture("flux-tiny")["controlnet"]), tmp_path / "cn.safetensors")
    with start(
        ServeConfig(family="flux", controlnets=(str(tmp_path / "cn.safetensors"),), limits=LIMITS)
    ) as srv:
        health = httpx.get(f"{srv.url}/api/health").json()
        assert health["native_size"] == 128 and health["defaults"]["sampler"] == "euler"
        body = {"prompt": "red circle with blue background", "steps": 2, "seed": 1}
        r = httpx.post(
            f"{srv.url}/api/generate", json={**body, "controls": [{"image": b64(square(128))}]}, timeout=120
        )
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]).shape[:2] == (128, 128)
        assert r.json()["sidecar"]["request"]["sampler"] == "euler"


def test_a_server_of_the_bundled_model_fills_in_its_settings(client):
    # the module's server runs given model files: SD's defaults, as the request class has them
    sent = client.post("/api/generate", json=gen()).json()["sidecar"]["request"]
    sd = GenerationRequest()
    assert (sent["guidance"], sent["added_prompt"], sent["negative_prompt"]) == (
        sd.guidance,
        sd.added_prompt,
        sd.negative_prompt,
    )
    # a server of the bundled model (no model files given): the settings it was made for, unless sent
    with start(ServeConfig(limits=LIMITS)) as srv:
        health = httpx.get(f"{srv.url}/api/health").json()
        assert {k: health["defaults"][k] for k in BUNDLED_SETTINGS} == BUNDLED_SETTINGS
        body = {"prompt": "red circle with blue background", "steps": 2, "seed": 1}
        body["controls"] = [{"image": b64(square(128))}]
        explicit = {**BUNDLED_SETTINGS, "guidance": 9.0}
        for extra, want in (({}, BUNDLED_SETTINGS), ({"guidance": 9.0}, explicit)):
            r = httpx.post(f"{srv.url}/api/generate", json={**body, **extra}, timeout=120)
            assert r.status_code == 200, r.text
            request = r.json()["sidecar"]["request"]
            assert {k: request[k] for k in want} == want


def test_a_server_vae_decodes_every_generation(server, client, tmp_path):
    """`serve --vae`: the server's VAE decodes every request (a field clients cannot set)."""
    from tiny import make_vae

    base, cns = server.files
    make_vae(seed=5).save_pretrained(tmp_path / "vae")
    with start(
        ServeConfig(base=base, controlnets=tuple(cns), vae=str(tmp_path / "vae"), limits=LIMITS)
    ) as srv:
        r = httpx.post(f"{srv.url}/api/generate", json=gen(), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["sidecar"]["request"]["vae"] == "vae"  # its name: no server path
        other = decode(r.json()["images"][0])
    own = client.post("/api/generate", json=gen())
    assert own.json()["sidecar"]["request"]["vae"] is None
    assert not np.array_equal(decode(own.json()["images"][0]), other)
    assert client.post("/api/generate", json=gen(vae="x")).status_code == 422


def test_server_loras_are_merged_into_every_generation(server, client, tmp_path):
    """`serve --lora FILE:SCALE`: merged into the served base for every request (a field clients
    cannot set), recorded in each sidecar."""
    from controlnet.formats import load_base
    from tiny import lora_file

    base, cns = server.files
    lora = str(lora_file(tmp_path / "style.safetensors", load_base(base).unet))
    with start(ServeConfig(base=base, controlnets=tuple(cns), loras=((lora, 2.0),), limits=LIMITS)) as srv:
        r = httpx.post(f"{srv.url}/api/generate", json=gen(), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["sidecar"]["request"]["loras"] == [{"path": "style.safetensors", "scale": 2.0}]
        styled = decode(r.json()["images"][0])
    own = client.post("/api/generate", json=gen())
    assert own.json()["sidecar"]["request"]["loras"] == []
    assert not np.array_equal(decode(own.json()["images"][0]), styled)
    refused = client.post("/api/generate", json=gen(loras=[{"path": lora}]))
    assert refused.status_code == 422 and "set by the server" in refused.text


def test_uploads_are_stored_once_and_cleaned_up_with_the_server(tmp_path):
    base, cns = model_files(tmp_path)
    service = Service(ServeConfig(base=base, controlnets=(cns[0],)))
    a = service.store_image(png_bytes(square()), "x")
    assert service.store_image(square(), "y") == a  # same pixels, same file
    np.testing.assert_array_equal(read_image(a), square())
    assert service.output_size(
        check(GenerationRequest(controls=[ControlRequest(image=a)], resolution=128))
    ) == (
        128,
        128,
    )
    service.close()
    assert not service.upload_dir.exists()


def test_preprocess_at_a_resolution_is_the_map_a_generation_feeds_the_model(client):
    """What the web app previews (the map at the generation's size) is what the model gets."""
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # resized to 64x(multiple of 64)
    params = {"low_threshold": 60, "high_threshold": 120}
    pre = client.post(
        "/api/preprocess",
        json={
            "annotator": "canny",
            "image": b64(photo),
            "params": params,
            "resolution": 64,
            "detect_resolution": 64,
        },
    )
    control = {"image": b64(photo), "preprocess": "canny", "params": params}
    out = client.post("/api/generate", json=gen(controls=[control]))
    assert pre.status_code == out.status_code == 200, (pre.text, out.text)
    np.testing.assert_array_equal(decode(pre.json()["image"]), decode(out.json()["conditions"][0]))


def readme_block(language: str) -> str:
    """The first ``language`` code block of the README's web app section."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Web app and HTTP API") :]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    return next(b for b in blocks if "/api/" in b)


def test_readme_python_example_runs(server, tmp_path, monkeypatch, capsys):
    code = (
        readme_block("python")
        .replace("http://127.0.0.1:7860", server.url)
        .replace('"steps": 20', '"steps": 2')
    )
    Image.fromarray(square(128)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert "[42, 43] ddim" in capsys.readouterr().out
    assert Image.open("canny.png").size == (128, 128)
    assert [Image.open(f"result_{i}.png").size for i in range(2)] == [(128, 128)] * 2


def test_readme_shell_example_runs(server, tmp_path):
    script = (
        readme_block("sh").replace("http://127.0.0.1:7860", server.url).replace('"steps": 20', '"steps": 2')
    )
    Image.fromarray(square(128)).save(tmp_path / "photo.png")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert '"status":"ok"' in done.stdout
    assert Image.open(tmp_path / "canny.png").size == Image.open(tmp_path / "result.png").size == (128, 128)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_responses_name_no_server_path(client, server):
    """A sidecar in a response names the uploads relative to the output folder and the models by
    the server's names for them: nothing of the server's file system."""
    body = gen(init_image=b64(square()), denoise=0.5)
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    record = r.json()["sidecar"]
    base = server.files[0]
    texts = list(_strings(record))
    assert not [t for t in texts if t.startswith("/") or str(Path(base).parent) in t]
    assert record["inputs"]["init_image"]["path"].startswith("uploads/")
    assert record["request"]["controls"][0]["controlnet"] == "edges"
    # and the sidecar on the server replays from there, whatever the working folder
    sidecar = sorted(server.service.out_dir.glob("*.json"))[-1]
    assert json.loads(sidecar.read_text())["inputs"]["init_image"]["path"].startswith("uploads/")


def test_annotator_weights_are_chosen_by_name_never_by_path(server, tmp_path, monkeypatch):
    """Learned annotators use the weights the server offers (its annotator folder and
    serve --annotator-weights), by name. A path answers the same whether or not the file exists,
    so nothing of the server's files is revealed; a bad weights file is a 400, not a 500."""
    import torch

    from controlnet.annotators.hed import HEDNet

    monkeypatch.setenv("CONTROLNET_ANNOTATOR_DIR", str(tmp_path / "annotators"))
    good = tmp_path / "hed-good.pth"
    torch.save(HEDNet().state_dict(), good)
    bad = tmp_path / "hed-bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    base, cns = server.files
    config = ServeConfig(
        base=base, controlnets=tuple(cns), limits=LIMITS, annotator_weights=(str(good), str(bad))
    )
    with start(config) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        listed = {a["name"]: a["weights"] for a in c.get("/api/annotators").json()}
        assert listed["hed"] == ["hed-good.pth", "hed-bad.safetensors"] and listed["canny"] == []

        def pre(weights):
            body = {"annotator": "hed", "image": b64(square()), "params": {"weights": weights}}
            return c.post("/api/preprocess", json=body)

        r = pre("hed-good.pth")
        assert r.status_code == 200, r.text
        paths = ["/etc/passwd", str(good), "/no/such/file", "../hed-good.pth"]
        answers = [pre(w) for w in paths]
        assert {a.status_code for a in answers} == {400}
        texts = [a.json()["error"] for a in answers]
        assert "offers no annotator weights named '/etc/passwd'" in texts[0]
        # the same answer for a readable file, a server file, a missing one and a relative path
        assert len({t.replace(repr(w), "W") for t, w in zip(texts, paths)}) == 1
        r = pre("hed-bad.safetensors")
        assert r.status_code == 400 and "hed-bad.safetensors" in r.json()["error"], r.text
        assert c.get("/api/health").json()["queue"]["failed"] == 0
        # a generation's annotator, likewise
        body = gen(
            controls=[{"image": b64(square()), "preprocess": "hed", "params": {"weights": "/etc/passwd"}}]
        )
        r = c.post("/api/generate", json=body)
        assert r.status_code == 400 and "controls[0].params.weights" in r.json()["error"]


def test_any_json_body_gets_an_answer_never_a_500(client):
    """Arbitrary JSON at both POST routes (objects with the real field names among others):
    every answer is a status the docs list, never a 500, and the server keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    values = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    )
    names = st.sampled_from([*GenerateBody.model_fields, "annotator", "image", "params", "x"])
    bodies = st.dictionaries(names, values, max_size=5) | values

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/api/generate", "/api/preprocess"]))
    def check(body, route):
        r = client.post(route, content=json.dumps(body, allow_nan=True))
        assert r.status_code in (200, 400, 413, 422, 503), (route, body, r.text)
        assert r.status_code == 200 or "error" in r.json()

    check()
    assert client.get("/api/health").json()["queue"]["failed"] == 0
