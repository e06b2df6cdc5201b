"""benchmarks/bench_flux.py runs (its --tiny mode, on the CPU): the script the GPU sessions use
to measure Flux generation against diffusers builds both over the same weights, and their final
latents agree."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_flux_benchmark_runs_and_agrees_with_diffusers(tmp_path):
    out = tmp_path / "flux.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_flux.py"), "--tiny", "--peer", "--steps", "2"]
    done = subprocess.run(
        [*cmd, "--reps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [r["path"] for r in record["rows"]] == ["ours (default)", "diffusers eager"]
    assert record["max_abs_diff"] < 1e-4 and record["step_tflop"] > 0
    assert "| ours (default) |" in done.stdout
