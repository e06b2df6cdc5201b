"""Multi-GPU training: samples/s per GPU on 1, 2, 4 and 8 GPUs against one GPU, and memory per GPU.

Our real training loop (``controlnet.training.train.train``, through accelerate) under torchrun, one
process per GPU; the global batch grows with the GPU count. Scaling efficiency at N GPUs is
(samples/s at N) / (N x samples/s at 1).
    --family sd15 (default): data parallel, each process at batch 8 at 512 px on the SD1.5
        architecture, exactly the ControlNet row of bench_train.py.
    --family flux: Flux.1-dev shapes (random weights) and a ControlNet of ``--copied`` blocks (the
        recipe's 4,4 by default; 5,10 is the Union ControlNets' size), as bench_train_flux.py
        trains it; ``--shard`` shards the base and the ControlNet with FSDP2, set up as an
        accelerate config sets it (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``, the transformer
        wrap policy), so that the peak memory per GPU shows what sharding buys.
Each row says whether the run was sharded (accelerate's distributed type as the processes saw it).

    python benchmarks/bench_multigpu.py --out results/multigpu.json [--gpus 1,2,4,8] [--compile-mode M]
    python benchmarks/bench_multigpu.py --family flux --shard --copied 5,10 --gpus 1,2,8 \
        --out results/multigpu-flux-fsdp.json
"""

from __future__ import annotations

import argparse
import json
import math
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

#: what ``accelerate launch`` sets for a config of ``distributed_type: FSDP``, ``fsdp_version: 2``
#: and the transformer wrap policy (each block a unit: the classes the objective names)
SHARDED = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def worker(args: argparse.Namespace) -> None:
    """One process of a distributed run (started by torchrun): measure, and the main process
    writes the result."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    processes = PartialState(cpu=args.smoke)  # the process group, and this process's own GPU
    bench_train.SMOKE = args.smoke
    if args.family == "flux":
        import dataclasses

        import bench_train_flux

        from controlnet.families.flux import FluxControlNetConfig

        bench_train_flux.SMOKE = args.smoke
        case = bench_train_flux.flux_case()
        if not args.smoke:  # (the smoke test's model has one block of each kind)
            case = dataclasses.replace(case, copied=FluxControlNetConfig(*map(int, args.copied.split(","))))
        size = 32 if args.smoke else args.size  # (as bench_train_flux.py's smoke test)
        res = bench_train_flux.ours(
            case, args.batch, size, args.steps, checkpointing=False, compile_mode=args.compile_mode,
            out=args.run_dir,
        )  # fmt: skip
    else:
        res = bench_train.ours(
            "controlnet",
            args.batch,
            args.steps,
            compile=args.compile_mode,
            checkpointing=False,
            out=args.run_dir,
        )
    res["sharded"] = processes.distributed_type == DistributedType.FSDP
    if processes.is_main_process:
        Path(args.result).write_text(json.dumps(res))


def launch(n: int, args: argparse.Namespace) -> dict[str, float]:
    """Run the measurement on ``n`` processes; return the main process's result (a run that
    failed, e.g. out of memory: NaN, and its exit status, so that the next row still runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            __file__, "--worker", "--result", str(result), "--run-dir", str(Path(tmp) / "run"),
            "--batch", str(args.batch), "--steps", str(args.steps), "--family", args.family,
            "--size", str(args.size), "--copied", args.copied,
            *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
            *(["--smoke"] if args.smoke else []),
        ]  # fmt: skip
        env = {**os.environ, **(SHARDED if args.shard else {})}
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0 or not result.is_file():
            print(f"{n} processes: the run failed (exit status {done.returncode})", flush=True)
            return {
                "samples_per_s": math.nan,
                "peak_gib": math.nan,
                "sharded": None,
                "failed": done.returncode,
            }
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to measure, comma-separated (1 first)")
    p.add_argument("--family", choices=("sd15", "flux"), default="sd15")
    p.add_argument("--batch", type=int, default=None, help="per GPU (default: sd15 8, flux 1)")
    p.add_argument("--size", type=int, default=512, help="flux: the images' side")
    p.add_argument("--copied", default="4,4", help="flux: the ControlNet's double,single blocks")
    p.add_argument("--shard", action="store_true", help="FSDP2 through accelerate's config (see above)")
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
    if args.batch is None:
        args.batch = 8 if args.family == "sd15" else 1
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
            "peak_gib_gpu0": r["peak_gib"], "sharded": r["sharded"], "failed": r.get("failed", 0),
        })  # fmt: skip
        print(rows[-1], flush=True)
    mode = args.compile_mode or "eager"
    record = {"env": environment(), "command": " ".join(sys.argv), "family": args.family, "mode": mode}
    write_json(args.out, {**record, "rows": rows})
    print()
    columns = [
        "gpus",
        "global_batch",
        "samples_per_s",
        "per_gpu",
        "efficiency",
        "peak_gib_gpu0",
        "sharded",
        "failed",
    ]
    print(table(rows, columns))


if __name__ == "__main__":
    main()
