"""The generation benchmarks against diffusers' pipelines run (their --tiny mode, on the CPU):
bench_flux.py, bench_sd3.py, bench_qwenimage.py, bench_zimage.py and bench_sdxl_controls.py (a
Union ControlNet with two conditions; a ControlNet with a T2I-Adapter) build ours and the peer over
the same weights, and their final latents agree; bench_train_flux.py and bench_train_sd3.py time
our training loop and diffusers' recipe step, and profile ours."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script",
    [
        ["bench_flux.py"],
        ["bench_sd3.py"],
        ["bench_qwenimage.py"],
        ["bench_zimage.py", "--guidance", "5"],
        ["bench_sdxl_controls.py", "--case", "union"],
        ["bench_sdxl_controls.py", "--case", "adapter"],
    ],
    ids=["flux", "sd3", "qwenimage", "zimage", "sdxl-union", "sdxl-controlnet-adapter"],
)
def test_the_benchmark_runs_and_agrees_with_diffusers(tmp_path, script):
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / script[0]),
        *script[1:],
        "--tiny",
        "--peer",
        "--steps",
        "2",
        "--reps",
        "1",
    ]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [r["path"] for r in record["rows"]] == ["ours eager", "ours (default)", "diffusers eager"]
    assert record["max_abs_diff"] < 1e-4 and record["step_tflop"] > 0
    assert record["rows"][1]["max |diff| vs ours eager"] == 0  # the default path changes no operation
    assert "| ours (default) |" in done.stdout


@pytest.mark.parametrize("script", ["bench_train_flux.py", "bench_train_sd3.py"], ids=["flux", "sd3"])
def test_the_training_benchmark_runs_ours_and_the_recipe(tmp_path, script):
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--peer", "--profile"]
    cmd += ["--steps", "3"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [r["run"] for r in record["rows"]] == ["diffusers recipe", "ours"]
    assert all(r["samples_per_s"] > 0 for r in record["rows"]) and record["tflop_per_sample"] > 0
    profile = record["profile, ours, ms per step"]  # GPU (here CPU) time by kind, beside the wall time
    assert profile["wall ms"] > 0 and profile["total"] > 0 and out.with_suffix(".kernels.txt").is_file()


def test_the_multi_gpu_benchmark_runs_a_flux_controlnet_on_several_processes(tmp_path):
    """bench_multigpu.py --family flux (here two CPU processes, which accelerate runs data parallel
    even with --shard: each row records what the processes ran)."""
    out = tmp_path / "multigpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_multigpu.py"), "--smoke", "--family", "flux"]
    cmd += ["--gpus", "1,2", "--steps", "3", "--shard", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["gpus"], r["global_batch"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(r["samples_per_s"] > 0 and r["sharded"] is False and r["failed"] == 0 for r in rows)
