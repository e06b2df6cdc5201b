"""The web app in a real browser: `controlnet serve` in a subprocess, headless Chromium through
Playwright. Upload an image, preview the Canny map, generate, find the image in the gallery.

Chromium is Debian's (``make test`` installs it); Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from controlnet.annotators import prepare_condition
from serving import model_files, square

CHROMIUM = os.environ.get("CONTROLNET_CHROMIUM", "/usr/bin/chromium")
# as root, on a closed network: no sandbox, no GPU, no calls home
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def start_serve(args: list[str], log: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Run `controlnet serve ARGS --port 0`, its output going to ``log`` (a pipe nobody reads would
    fill up and stall the server), and return the process and the URL it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controlnet.cli", "serve", "--port", "0", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("controlnet serve: http://"):
                return proc, line.split()[2]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("controlnet serve did not start:\n" + log.read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    base, cns = model_files(d)
    canny = d / "control_sd15_canny.safetensors"  # named as released: the units start with canny
    canny.write_bytes(Path(cns[0]).read_bytes())
    out = d / "results"
    proc, url = start_serve(["--base", base, "--controlnet", str(canny), "--out", str(out)], d / "serve.log")
    yield url, out
    proc.terminate()  # a graceful stop: finishes, removes its temporary folder, exits 0
    assert proc.wait(30) == 0


@pytest.fixture
def page(served):
    assert Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(served[0])
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def toasts(page) -> str:
    return "\n".join(t.inner_text() for t in page.locator(".toast-body").all())


def stroke(page, editor: str) -> None:
    """Select the editor's brush and paint a short zigzag through the middle of its canvas."""
    page.locator(f"{editor} button[aria-label=Brush]").click()
    canvas = page.locator(f"{editor} canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2 - 60
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 5):  # few moves: the canvas is drawn in software here, each move costs
        page.mouse.move(x + (k % 2) * 20, y + k * 30)
    page.mouse.up()
    page.wait_for_timeout(300)


def set_number(page, elem: str, value: str) -> None:
    """Type ``value`` into the number box of ``#elem`` and see that it holds. A slider mounted by
    opening its accordion takes its initial value a frame or two after it appears, which can undo
    what was typed in that window; typing again then sticks."""
    box = page.locator(f"#{elem} input").first
    for _ in range(5):
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(200)
        if box.input_value() == value:
            return
    raise AssertionError(f"#{elem} does not keep {value!r}: it shows {box.input_value()!r}")


def fetch(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(url, timeout=30).content)))


def wait_for_sidecars(out: Path, n: int, page) -> dict:
    page.wait_for_function(
        f"document.querySelector('#downloads').innerText.includes('{n - 1:05d}-')"
        " && document.querySelector('#downloads').innerText.includes('.json')"
    )
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == n, sidecars
    return json.loads(sidecars[-1].read_text())


def test_the_web_app_in_a_browser(page, served, tmp_path):
    url, out = served
    # nothing uploaded yet: a clear message, no generation
    page.click("#generate")
    page.wait_for_function("document.body.innerText.includes('upload an image first')")

    # upload: the live preview shows the Canny map, exactly the library's at the preview size
    Image.fromarray(square()).save(tmp_path / "square.png")
    page.locator("#control-0-image input[type=file]").set_input_files(str(tmp_path / "square.png"))
    preview = page.locator("#control-0-preview img")
    preview.wait_for()
    native = httpx.get(f"{url}/api/health").json()["native_size"]
    expected = prepare_condition("canny", square(), resolution=native, detect_resolution=native)
    np.testing.assert_array_equal(fetch(preview.get_attribute("src")), expected)

    # the prompt box counts the tokens the encoder will read (with the added prompt)
    page.locator("#prompt textarea").fill(", ".join(f"a photo number {i}" for i in range(30)))
    page.wait_for_function("document.querySelector('#prompt-tokens').innerText.includes('(3 chunks of 75)')")

    # generate: an image in the gallery, and the sidecar records what the page asked for
    for elem, value in (("steps", "2"), ("resolution", "64"), ("seed", "11")):
        set_number(page, elem, value)
    page.click("#generate")
    page.locator("#gallery img").first.wait_for()
    record = wait_for_sidecars(out, 1, page)
    req = record["request"]
    assert (req["steps"], req["resolution"], req["seed"]) == (2, 64, 11)
    assert req["prompt_syntax"] == "weighted"
    assert (
        req["controls"][0]["preprocess"] == "canny" and req["controls"][0]["params"]["low_threshold"] == 100
    )
    assert Image.open(out / record["outputs"]["images"][0]["file"]).size == (64, 64)

    # Interrupt: a long generation stops after the step it is in and shows the images it has.
    # Checked before any drawing canvas is mounted: Chromium paints those in software here, and
    # under load a click could wait a minute behind their frames.
    for elem, value in (("steps", "100"), ("resolution", "512")):  # long enough to catch running
        set_number(page, elem, value)
    page.click("#generate")
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/api/health").json()["queue"]["running"] == 0:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.05)
    page.click("#interrupt")
    page.wait_for_function("document.querySelector('#info').innerText.includes('interrupted after step')")
    stopped = wait_for_sidecars(out, 2, page)["outputs"]["stopped"]
    assert stopped["of"] == 100 and 0 < stopped["after_step"] < 100
    for elem, value in (("steps", "2"), ("resolution", "64")):  # short again for what follows
        set_number(page, elem, value)

    # the hires fix: the same request, refined at twice the size
    page.get_by_text("Hires fix", exact=True).click()
    for value, n in (("2", 3), ("1", None)):  # on, generate; then off again for what follows
        set_number(page, "hires-scale", value)
        if n:
            page.click("#generate")
            record = wait_for_sidecars(out, n, page)
            assert record["request"]["hires_scale"] == 2.0
            assert Image.open(out / record["outputs"]["images"][0]["file"]).size == (128, 128)

    # a region mask: stored as a mask upload and read by the generation (the sidecar names it)
    region = np.zeros((64, 64), np.uint8)
    region[:, :32] = 255
    Image.fromarray(region).save(tmp_path / "region.png")
    page.get_by_text("Region mask", exact=True).click()
    page.locator("#control-0-region input[type=file]").set_input_files(str(tmp_path / "region.png"))
    page.locator("#control-0-region img").first.wait_for()
    page.click("#generate")
    record = wait_for_sidecars(out, 4, page)
    stored = record["request"]["controls"][0]["region_mask"]
    assert stored.startswith("uploads/") and record["inputs"]["controls[0].region_mask"]["path"] == stored
    np.testing.assert_array_equal(np.asarray(Image.open(out / stored)), region)  # relative to the sidecar

    # a file that is not an image: a one-line message naming the input
    (tmp_path / "notes.png").write_text("these are not pixels")
    page.locator("#control-0-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
    page.wait_for_function("document.body.innerText.includes('control 1 image: not an image')")

    # draw instead: the scribble annotator is chosen and previews white strokes on black
    page.locator("#control-0-source").get_by_text("draw").click()
    page.wait_for_function("document.querySelector('#control-0-annotator input').value === 'scribble'")
    old = preview.get_attribute("src")
    stroke(page, "#control-0-sketch")
    page.click("#control-0-preview-button")
    page.wait_for_function(
        f"(document.querySelector('#control-0-preview img') || {{}}).src !== {json.dumps(old)}"
    )
    scribble = fetch(preview.get_attribute("src"))
    assert set(np.unique(scribble)) == {0, 255} and (scribble == 255).mean() < 0.5

    # masked editing: upload an init image, paint the region to regenerate, generate
    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(init).save(tmp_path / "init.png")
    page.get_by_text("Image to image and masked editing").click()
    page.locator("#init-image input[type=file]").set_input_files(str(tmp_path / "init.png"))
    page.locator("#init-image canvas").first.wait_for()
    page.wait_for_timeout(500)
    stroke(page, "#init-image")
    page.locator("#prompt-syntax").get_by_text("plain", exact=True).click()
    page.click("#generate")
    record = wait_for_sidecars(out, 5, page)
    req = record["request"]
    assert req["controls"][0]["preprocess"] == "scribble" and req["denoise"] == 0.75
    assert req["prompt_syntax"] == "plain"
    mask = np.asarray(Image.open(out / req["mask"])) > 127
    np.testing.assert_array_equal(np.asarray(Image.open(out / req["init_image"])), init)
    assert 0 < mask.mean() < 1  # some pixels painted, some kept
    result = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    np.testing.assert_array_equal(result[~mask], init[~mask])  # every kept pixel is the init image's

    # the inpaint annotator reads that painted mask: its map has no condition (alpha 0) there
    old = preview.get_attribute("src")
    annotator = page.locator("#control-0-annotator input")
    annotator.click()
    annotator.fill("inpaint")
    annotator.press("Enter")
    page.wait_for_function(
        f"(document.querySelector('#control-0-preview img') || {{}}).src !== {json.dumps(old)}"
    )
    inpaint_map = fetch(preview.get_attribute("src"))
    assert inpaint_map.shape[2] == 4 and abs((inpaint_map[..., 3] == 0).mean() - mask.mean()) < 0.05
    page.click("#generate")
    record = wait_for_sidecars(out, 6, page)
    assert record["request"]["controls"][0]["preprocess"] == "inpaint" and record["request"]["mask"]

    assert "internal error" not in toasts(page)
    assert httpx.get(f"{url}/api/health").json()["queue"] == {
        "waiting": 0,
        "running": 0,
        "done": 6,
        "failed": 0,
        "max_concurrent": 1,
    }
