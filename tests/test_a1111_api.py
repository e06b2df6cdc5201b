"""Clients of the A1111 web UI's API against our server: the registry's `webuiapi` client as a
user's script drives it (txt2img with one and two ControlNet units, img2img with a mask, detect,
the model, sampler and module lists, progress while a job runs, interrupt), raw HTTP for the
rest, and the same job through our own API giving bit-identical images."""

from __future__ import annotations

import base64
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from controlnet.annotators import prepare_condition
from controlnet.serving.a1111 import fill_masked
from controlnet.serving.a1111_names import sampler_of
from controlnet.serving.limits import Limits
from serving import b64, decode, hold_at_step, serve_tiny, square


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = serve_tiny(tmp_path_factory.mktemp("models"), Limits(max_steps=20, max_samples=4))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    url = urlparse(server.url)
    return webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler a", steps=3)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def ring(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    return np.repeat(((r > size / 5) & (r < size / 3))[..., None] * 255, 3, axis=2).astype(np.uint8)


def arrays(result) -> list[np.ndarray]:
    return [np.asarray(i.convert("RGB")) for i in result.images]


def test_what_a_client_reads_before_it_starts(api, http):
    assert api.util_get_model_names() == ["base.safetensors"]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert "Karras" in [s["label"] for s in api.get_schedulers()]
    assert api.get_options()["sd_model_checkpoint"] == "base.safetensors"
    assert api.controlnet_model_list() == ["edges", "second"]
    modules = api.controlnet_module_list()
    assert {"none", "canny", "invert", "tile_resample", "inpaint_global_harmonious"} <= set(modules)
    assert "depth_midas" not in modules  # its weights are not offered by this server
    assert api.controlnet_version() == 3
    assert api.has_controlnet  # so the client sends empty units, not none, when it has none
    assert http.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    detail = http.get("/controlnet/module_list").json()["module_detail"]["canny"]
    assert detail["sliders"][0] == {"name": "low_threshold", "value": 100, "min": 1, "max": 255}


def test_txt2img_with_one_unit_equals_our_api(api, http):
    unit = webuiapi.ControlNetUnit(
        image=pil(square()), module="canny", model="edges", pixel_perfect=True, weight=0.8, guidance_end=0.7
    )
    r = api.txt2img(prompt="a square", seed=5, width=64, height=64, cfg_scale=6, controlnet_units=[unit])
    samples = arrays(r)
    assert len(samples) == 2  # the sample, then the unit's detected map (as the extension sends it)
    assert r.info["all_seeds"] == [5] and r.info["steps"] == 3 and r.info["sampler_name"] == "Euler a"
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.8' in r.info["infotexts"][0]
    assert r.parameters["alwayson_scripts"]["ControlNet"]["args"][0]["module"] == "canny"
    # the client's unit defaults: thresholds 64 and 64, Resize and Fill, Balanced
    np.testing.assert_array_equal(
        samples[1], prepare_condition("canny", square(), low_threshold=64, high_threshold=64)
    )
    ours = {
        "prompt": "a square",
        "prompt_setting": "user",
        "added_prompt": "",
        "negative_prompt": "",
        "sampler": "euler-a",
        "steps": 3,
        "guidance": 6,
        "seed": 5,
        "width": 64,
        "height": 64,
        "resize_mode": "fill",
        "controls": [
            {
                "image": b64(square()),
                "controlnet": "edges",
                "preprocess": "canny",
                "params": {"low_threshold": 64, "high_threshold": 64},
                "strength": 0.8,
                "end": 0.7,
            }
        ],
    }
    mine = http.post("/api/generate", json=ours)
    assert mine.status_code == 200, mine.text
    np.testing.assert_array_equal(decode(mine.json()["images"][0]), samples[0])


def test_txt2img_with_two_units_and_a_batch(api):
    units = [
        webuiapi.ControlNetUnit(image=pil(square()), module="canny", model="edges [1234abcd]"),
        webuiapi.ControlNetUnit(image=pil(ring()), module="none", model="second", control_mode=1),
        webuiapi.ControlNetUnit(image=pil(ring()), module="canny", model="edges", enabled=False),
    ]
    r = api.txt2img(prompt="shapes", seed=9, batch_size=2, width=64, height=64, controlnet_units=units)
    images = arrays(r)
    assert len(images) == 3 and r.info["all_seeds"] == [9, 10]  # two samples, one detected map
    assert not np.array_equal(images[0], images[1])
    # the units change the image: the same job without them differs
    plain = arrays(api.txt2img(prompt="shapes", seed=9, batch_size=2, width=64, height=64))
    assert len(plain) == 2 and not np.array_equal(plain[0], images[0])


def test_img2img_with_a_mask_keeps_what_is_not_masked(api, http):
    init = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    unit = webuiapi.ControlNetUnit(module="canny", model="edges", pixel_perfect=True)  # reads the init image
    r = api.img2img(
        images=[pil(init)],
        mask_image=pil(mask),
        inpaint_full_res=False,
        inpainting_fill=1,
        mask_blur=0,
        denoising_strength=0.6,
        prompt="a patch",
        seed=3,
        width=64,
        height=64,
        controlnet_units=[unit],
    )
    out = arrays(r)[0]
    kept = mask == 0
    np.testing.assert_array_equal(out[kept], init[kept])
    assert not np.array_equal(out[~kept], init[~kept])
    assert r.info["denoising_strength"] == 0.6
    # "fill": the masked pixels are painted from their surroundings before the job (our fill)
    filled = fill_masked(init, mask > 0)
    np.testing.assert_array_equal(filled[kept], init[kept])
    assert filled[~kept].std() < init[~kept].std() / 2
    # "Only masked" inpainting is not served: a 400 naming the field
    with pytest.raises(RuntimeError, match="inpaint_full_res"):
        api.img2img(images=[pil(init)], mask_image=pil(mask), prompt="x", width=64, height=64)


def test_detect_runs_the_module(api, http):
    r = api.controlnet_detect([pil(square(128))], module="canny", processor_res=64)
    got = np.asarray(r.images[0])
    want = prepare_condition("canny", square(128), detect_resolution=64, low_threshold=64, high_threshold=64)
    np.testing.assert_array_equal(got, want)
    raw = http.post(
        "/controlnet/detect", json={"controlnet_module": "mlsd", "controlnet_input_images": [b64(square())]}
    )
    assert raw.status_code == 400 and raw.json()["detail"].startswith(
        "controlnet_module: 'mlsd' is not served"
    )


@pytest.fixture
def gate(monkeypatch):
    reached, release = hold_at_step(monkeypatch, 2)
    yield reached, release
    release.set()


def test_progress_while_a_job_runs_then_interrupt(api, gate):
    reached, release = gate
    assert api.get_progress()["state"]["job_count"] == 0
    with ThreadPoolExecutor(1) as pool:
        unit = webuiapi.ControlNetUnit(image=pil(square()), module="canny", model="edges")
        job = pool.submit(
            api.txt2img, prompt="a square", seed=1, steps=6, width=64, height=64, controlnet_units=[unit]
        )
        assert reached.wait(60)
        progress = api.get_progress()
        assert progress["state"]["sampling_step"] == 1 and progress["state"]["sampling_steps"] == 6
        assert progress["progress"] == pytest.approx(1 / 6, abs=1e-3) and progress["eta_relative"] > 0
        assert progress["state"]["job_count"] == 1 and progress["state"]["interrupted"] is False
        api.interrupt()
        assert api.get_progress()["state"]["interrupted"] is True
        release.set()
        r = job.result(timeout=60)
    assert r.info["interrupted"] == {"after_step": 2, "of": 6} and len(r.images) == 2
    after = api.txt2img(prompt="a square", seed=1, steps=2, width=64, height=64)  # the queue is free
    assert "interrupted" not in after.info and api.get_progress()["progress"] == 0.0


def test_a_live_preview_of_the_running_job(server, api, gate):
    reached, release = gate
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(api.txt2img, prompt="x", seed=2, steps=6, width=64, height=64)
        assert reached.wait(60)
        assert api.get_progress()["current_image"] is None  # asked now: made after the next step
        release.set()
        job.result(timeout=60)
    # (the preview of a finished job is gone with it; the watch made one at step 2)


def post(http, route, payload):
    # (as JSON text: NaN is written as NaN, which some clients send and httpx would refuse)
    r = http.post(route, content=json.dumps(payload), headers={"content-type": "application/json"})
    return r.status_code, r.json()


def unit(**kw):
    return {"enabled": True, "image": b64(square()), "module": "canny", "model": "edges", **kw}


def body(*units, **kw):
    return {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1, **kw} | (
        {"alwayson_scripts": {"controlnet": {"args": list(units)}}} if units else {}
    )


@pytest.mark.parametrize(
    "payload, field",
    [
        (body(unit(module="mlsd")), "alwayson_scripts.controlnet.args[0].module: 'mlsd' is not served"),
        (body(unit(model="control_v11p_sd15_depth")), "alwayson_scripts.controlnet.args[0].model"),
        (body(unit(image="not base64!")), "alwayson_scripts.controlnet.args[0].image: not valid base64"),
        (body(unit(image=b64(b"not an image at all"))), "alwayson_scripts.controlnet.args[0].image"),
        (body(unit(image={"image": b64(square(64)), "mask": b64(square(32))})), "mask"),
        (body(unit(control_mode="Prompt first")), "control_mode"),
        (body(unit(resize_mode="Stretch it")), "resize_mode"),
        (body(sampler_name="Heun"), "sampler_name: 'Heun' is not served"),
        (body(scheduler="Exponential"), "scheduler"),
        (body(restore_faces=True), "restore_faces"),
        (body(cfg_scale=float("nan")), "cfg_scale: expected a finite number"),
        (body(steps="many"), "steps: expected a finite number"),
        (body(steps=500), "steps=500 is over this server's limit"),
        (body(alwayson_scripts={"ADetailer": {"args": [True, {}]}}), "ADetailer is not served"),
        (body(override_settings={"sd_model_checkpoint": "sdxl.safetensors"}), "sd_model_checkpoint"),
        (body(enable_hr=True, hr_upscaler="R-ESRGAN 4x+"), "hr_upscaler"),
    ],
)
def test_bad_payloads_get_a_400_naming_the_field(http, payload, field):
    status, answer = post(http, "/sdapi/v1/txt2img", payload)
    assert status == 400, answer
    assert field in answer["error"] and answer["detail"] == answer["error"]


def test_malformed_bodies_never_get_a_500(http):
    assert http.post("/sdapi/v1/txt2img", content=b"{not json").status_code == 400
    assert http.post("/sdapi/v1/txt2img", json=[1, 2]).status_code == 422
    status, answer = post(http, "/sdapi/v1/img2img", body(init_images=["!!"]))
    assert status == 400 and "init_images[0]" in answer["error"]
    status, answer = post(http, "/sdapi/v1/img2img", body())
    assert status == 400 and "init_images: one image is served, got 0" in answer["error"]
    for shape in ([1], {"controlnet": "x"}, {"controlnet": {"args": 3}}):
        status, answer = post(http, "/sdapi/v1/txt2img", body(alwayson_scripts=shape))
        assert status == 400 and "alwayson_scripts" in answer["error"], answer
    status, answer = post(http, "/sdapi/v1/txt2img", body(override_settings=[1]))
    assert status == 400 and "override_settings" in answer["error"]
    status, answer = post(http, "/sdapi/v1/txt2img", body(unit(image=None)))
    assert status == 400 and "a unit needs an image in txt2img" in answer["error"]
    assert http.get("/sdapi/v1/progress").status_code == 200  # still serving


def test_unknown_fields_are_ignored_and_logged(http, caplog):
    with caplog.at_level(logging.INFO, logger="controlnet.serving.a1111_api"):
        status, answer = post(http, "/sdapi/v1/txt2img", body(unit(), a_field_of_some_fork=3))
    assert status == 200 and json.loads(answer["info"])["all_seeds"] == [1]
    assert "a_field_of_some_fork" in caplog.text


def test_options_set_what_a_client_may_choose(http):
    status, answer = post(http, "/sdapi/v1/options", {"sd_model_checkpoint": "other.ckpt"})
    assert status == 400 and "sd_model_checkpoint: 'other.ckpt' is not served" in answer["error"]
    try:
        assert post(http, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2})[0] == 200
        assert http.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        _, answer = post(http, "/sdapi/v1/txt2img", body())
        assert json.loads(answer["info"])["clip_skip"] == 2
    finally:
        post(http, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1})


def test_sampler_names_map_to_ours():
    assert sampler_of("DPM++ 2M Karras", None)[0].value == "dpmpp-2m-karras"
    assert sampler_of("DPM++ 2M", "Automatic")[0].value == "dpmpp-2m-karras"  # the web UI's default
    assert sampler_of("DPM++ 2M", "uniform")[0].value == "dpmpp-2m"
    assert [v.value for v in sampler_of("Euler", "SGM Uniform")] == ["euler", "trailing"]
    assert sampler_of("euler a", None)[0].value == "euler-a"
    with pytest.raises(ValueError, match="Karras is served with DPM"):
        sampler_of("Euler", "karras")


def test_the_answer_images_are_pngs_with_the_info_as_a_json_string(http):
    status, answer = post(http, "/sdapi/v1/txt2img", body(send_images=True))
    assert status == 200 and isinstance(answer["info"], str)
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert image.format == "PNG" and image.size == (64, 64)
    _, quiet = post(http, "/sdapi/v1/txt2img", body(send_images=False))
    assert quiet["images"] == [] and json.loads(quiet["info"])["all_seeds"] == [1]


def test_img2img_fill_is_our_job_on_the_filled_image(http):
    """Raw HTTP with the web UI's defaults for what is left out: masked content "fill" (the masked
    pixels painted from around them first) - the same images as our API given that filled image."""
    init = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 20:60] = 255
    payload = body(init_images=[b64(init)], mask=b64(mask), denoising_strength=0.5, sampler_name="DDIM")
    status, answer = post(http, "/sdapi/v1/img2img", payload)
    assert status == 400 and "inpaint_full_res: 'Only masked' (the web UI's default)" in answer["error"]
    status, answer = post(http, "/sdapi/v1/img2img", {**payload, "inpaint_full_res": False})
    assert status == 200, answer
    ours = {
        "prompt": "x",
        "prompt_setting": "user",
        "added_prompt": "",
        "negative_prompt": "",
        "sampler": "ddim",
        "eta": 0.0,
        "steps": 2,
        "guidance": 7.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "init_image": b64(fill_masked(init, mask > 0)),
        "mask": b64(mask),
        "denoise": 0.5,
    }
    mine = http.post("/api/generate", json=ours)
    assert mine.status_code == 200, mine.text
    np.testing.assert_array_equal(decode(answer["images"][0]), decode(mine.json()["images"][0]))
