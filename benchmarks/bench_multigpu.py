"""Multi-GPU training: samples/s per GPU on 1, 2, 4 and 8 GPUs against one GPU.

Our real training loop (``controlnet.training.train.train``, DDP through accelerate) under torchrun, one
process per GPU, each at batch 8 at 512 px on the SD1.5 architecture, exactly the ControlNet row
of bench_train.py; the global batch grows with the GPU count. Scaling efficiency at N GPUs is
(samples/s at N) / (N x samples/s at 1).

    python benchmarks/bench_multigpu.py --out results/multigpu.json [--gpus 1,2,4,8] [--compile-mode M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train
from common import environment, table, write_json


def worker(args: argparse.Namespace) -> None:
    """One process of a distributed run (started by torchrun): measure, and the main process
    writes the result."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    bench_train.SMOKE = args.smoke
    res = bench_train.ours(
        "controlnet", args.batch, args.steps, compile=args.compile_mode, checkpointing=False, out=args.run_dir
    )
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.result).write_text(json.dumps(res))


def launch(n: int, args: argparse.Namespace) -> dict[str, float]:
    """Run the measurement on ``n`` processes; return the main process's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            __file__, "--worker", "--result", str(result), "--run-dir", str(Path(tmp) / "run"),
            "--batch", str(args.batch), "--steps", str(args.steps),
            *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
            *(["--smoke"] if args.smoke else []),
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to measure, comma-separated (1 first)")
    p.add_argument("--batch", type=int, default=8, help="per GPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--compile-mode", default=None, help="measure with --compile in this mode (default: eager)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, CPU processes: check the script, time nothing"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    counts = [int(n) for n in args.gpus.split(",")]
    if counts[0] != 1:
        p.error("--gpus must start with 1: the efficiencies are against one GPU")
    have = torch.cuda.device_count()
    if not args.smoke and max(counts) > have:
        p.error(f"--gpus asks for {max(counts)} GPUs; this machine has {have}")
    rows: list[dict[str, Any]] = []
    for n in counts:
        r = launch(n, args)
        one = rows[0]["samples_per_s"] if rows else r["samples_per_s"]
        rows.append({
            "gpus": n, "global_batch": n * args.batch, "samples_per_s": r["samples_per_s"],
            "per_gpu": r["samples_per_s"] / n, "efficiency": r["samples_per_s"] / (n * one),
            "peak_gib_gpu0": r["peak_gib"],
        })  # fmt: skip
        print(rows[-1], flush=True)
    mode = args.compile_mode or "eager"
    write_json(args.out, {"env": environment(), "command": " ".join(sys.argv), "mode": mode, "rows": rows})
    print()
    print(table(rows, ["gpus", "global_batch", "samples_per_s", "per_gpu", "efficiency", "peak_gib_gpu0"]))


if __name__ == "__main__":
    main()
