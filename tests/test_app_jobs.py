"""Jobs of the HTTP API: a generation submitted, polled with its progress and a preview, and
cancelled - dropped from the queue before it runs, or stopped while it runs with the images it
has, whole files written and the queue free for the next job."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from controlnet.serving.limits import Limits
from serving import b64, decode, hold_at_step, serve_tiny, square


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = serve_tiny(tmp_path_factory.mktemp("models"), Limits(max_steps=20, max_samples=2))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def body(**kw):
    out = {"prompt": "a square", "steps": 6, "resolution": 64, "seed": 3}
    out["controls"] = [{"image": b64(square()), "preprocess": "canny"}]
    return {**out, **kw}


def wait_for(client, job_id, states, timeout=60.0, **params):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get(f"/api/jobs/{job_id}", params=params)
        assert r.status_code == 200, r.text
        if r.json()["state"] in states:
            return r.json()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {r.json()}")


@pytest.fixture
def gate(monkeypatch):
    """The running generation held at the start of its step-2 report until ``release`` is set."""
    reached, release = hold_at_step(monkeypatch, 2)
    yield reached, release
    release.set()


def test_a_submitted_job_is_polled_to_the_images_generate_makes(client):
    r = client.post("/api/jobs", json=body())
    assert r.status_code == 202, r.text
    job = r.json()
    assert set(job) == {"id", "state"} and job["state"] in ("queued", "running", "done")
    done = wait_for(client, job["id"], {"done"})
    assert done["step"] == done["total"] == 6 and done["progress"] == 1.0 and done["eta_s"] is None
    direct = client.post("/api/generate", json=body()).json()
    assert done["result"]["seeds"] == direct["seeds"] == [3]
    np.testing.assert_array_equal(decode(done["result"]["images"][0]), decode(direct["images"][0]))
    assert "stopped" not in done["result"]


def test_a_running_job_reports_progress_and_a_preview_then_stops_with_what_it_has(client, server, gate):
    r = client.post("/api/jobs", json=body(num_samples=2))
    job_id = r.json()["id"]
    reached, release = gate
    assert reached.wait(60)
    running = client.get(f"/api/jobs/{job_id}", params={"preview": "true"}).json()
    assert running["state"] == "running" and running["step"] == 1 and running["total"] == 6
    assert running["progress"] == pytest.approx(1 / 6, abs=1e-3) and running["eta_s"] > 0
    assert running["preview"] is None  # asked now: decoded after the next step
    stop = client.delete(f"/api/jobs/{job_id}")
    assert stop.status_code == 200 and stop.json()["state"] == "running"  # it stops after its step
    release.set()
    stopped = wait_for(client, job_id, {"stopped"}, preview="true")
    assert stopped["step"] == 2 and stopped["total"] == 6
    result = stopped["result"]
    assert result["stopped"] == {"after_step": 2, "of": 6} and result["seeds"] == [3, 4]
    images = [decode(i) for i in result["images"]]
    assert [i.shape for i in images] == [(64, 64, 3)] * 2
    preview = stopped["preview"]
    assert preview["step"] == 2 and decode(preview["image"]).shape == (64, 64, 3)
    # whole files: the sidecar names its images and says where the run was stopped
    record = result["sidecar"]
    assert record["outputs"]["stopped"] == {"after_step": 2, "of": 6}
    out_dir = server.service.out_dir
    sidecars = [json.loads(p.read_text()) for p in out_dir.glob("*.json")]
    assert any(s["outputs"].get("stopped") for s in sidecars)
    for name in (i["file"] for i in record["outputs"]["images"]):
        assert (out_dir / name).stat().st_size > 0
    # the queue is free: the next job runs to the end
    after = client.post("/api/generate", json=body())
    assert after.status_code == 200 and "stopped" not in after.json()
    assert client.get("/api/health").json()["queue"]["running"] == 0


def test_a_queued_job_cancelled_never_runs(client, server):
    before = client.get("/api/health").json()["queue"]
    release = threading.Event()
    hold = threading.Thread(target=server.service.run_exclusive, args=(lambda: release.wait(60),))
    hold.start()
    try:
        job_id = client.post("/api/jobs", json=body()).json()["id"]
        assert client.get(f"/api/jobs/{job_id}").json()["state"] == "queued"
        assert client.get("/api/health").json()["queue"]["waiting"] == 1
        r = client.delete(f"/api/jobs/{job_id}")
        assert r.status_code == 200 and r.json() == {"id": job_id, "state": "cancelled"}
        assert client.get("/api/health").json()["queue"]["waiting"] == 0
    finally:
        release.set()
        hold.join()
    assert wait_for(client, job_id, {"cancelled"})["step"] == 0
    after = client.get("/api/health").json()["queue"]
    assert after["done"] == before["done"] and after["failed"] == before["failed"]
    # cancelling again, or a finished job, changes nothing
    assert client.delete(f"/api/jobs/{job_id}").json()["state"] == "cancelled"


def test_unknown_jobs_and_bad_submissions(client):
    r = client.get("/api/jobs/no-such-job")
    assert r.status_code == 404 and "no job 'no-such-job'" in r.json()["error"]
    assert client.delete("/api/jobs/no-such-job").status_code == 404
    r = client.post("/api/jobs", json=body(steps=500))
    assert r.status_code == 400 and "steps=500" in r.json()["error"]
    r = client.post("/api/jobs", json=body(stepz=5))
    assert r.status_code == 422 and "stepz: unknown field" in r.json()["error"]
