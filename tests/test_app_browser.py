"""The web app in a real browser: `controlnet serve` in a subprocess, headless Chromium through
Playwright. Upload an image, preview the Canny map, generate, find the image in the gallery.

Chromium is Debian's (``make test`` installs it); Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import io
import json
import os
import select
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


def start_serve(args: list[str], timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Run `controlnet serve ARGS --port 0` and return the process and the URL it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlnet.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            seen.append(line)
            if line.startswith("controlnet serve: http://"):
                return proc, line.split()[2]
    proc.kill()
    raise AssertionError("controlnet serve did not start:\n" + "".join(seen) + proc.stdout.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    base, cns = model_files(d)
    out = d / "results"
    proc, url = start_serve(["--base", base, "--controlnet", cns[0], "--out", str(out)])
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


def test_upload_preview_canny_generate_in_a_browser(page, served, tmp_path):
    url, out = served
    # nothing uploaded yet: a clear message, no generation
    page.click("#generate")
    page.wait_for_function("document.body.innerText.includes('upload an image first')")

    Image.fromarray(square()).save(tmp_path / "square.png")
    page.locator("#control-0-image input[type=file]").set_input_files(str(tmp_path / "square.png"))
    preview = page.locator("#control-0-preview img")
    preview.wait_for()  # the live preview of the (default) Canny annotator
    shown = httpx.get(preview.get_attribute("src"), timeout=30)
    native = httpx.get(f"{url}/api/health").json()["native_size"]
    expected = prepare_condition("canny", square(), resolution=native, detect_resolution=native)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shown.content))), expected)

    for elem, value in (("steps", "2"), ("resolution", "64"), ("seed", "11")):
        box = page.locator(f"#{elem} input").first
        box.fill(value)
        box.press("Enter")
    page.click("#generate")
    page.locator("#gallery img").first.wait_for()
    page.wait_for_function("document.querySelector('#downloads').innerText.includes('.json')")

    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == 1
    record = json.loads(sidecars[0].read_text())
    req = record["request"]
    assert (req["steps"], req["resolution"], req["seed"]) == (2, 64, 11)
    assert (
        req["controls"][0]["preprocess"] == "canny" and req["controls"][0]["params"]["low_threshold"] == 100
    )
    assert Image.open(out / record["outputs"]["images"][0]["file"]).size == (64, 64)
    assert "not" not in toasts(page).split("upload an image first")[-1]  # no error after the first

    # a file that is not an image: a one-line message naming the input; the server keeps serving
    (tmp_path / "notes.png").write_text("these are not pixels")
    page.locator("#control-0-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
    page.wait_for_function("document.body.innerText.includes('control 1 image: not an image')")
    assert httpx.get(f"{url}/api/health").json()["queue"] == {
        "waiting": 0,
        "running": 0,
        "done": 1,
        "failed": 0,
        "max_concurrent": 1,
    }
