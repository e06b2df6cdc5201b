"""Inductor and cuDNN settings (coordinate-descent tuning, matmul autotuning), and fused attention
projections, against the batch-8 steps of profile_kernels.py: the ``--fast`` generation step
(UNet + one ControlNet on the CFG batch of 16, compiled) and the compiled training step
(reduce-overhead). Each variant is compiled afresh in this process and timed against the base of
the same process; the generation outputs of every variant are compared with the base's.

SD1.5 architecture, random weights, bf16, 512 px.

    python benchmarks/levers.py --out results/levers.json   # everything: well over an hour on an H100
    python benchmarks/levers.py --only gen                  # a part: gen or train
    python benchmarks/levers.py --only gen --variant "coordinate descent"   # base and one: 8 min
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).parent))
import profile_train
from common import cuda_time, environment, table, write_json
from profile_kernels import generation_step


@dataclass(frozen=True)
class Variant:
    descent: bool = False  # inductor's coordinate-descent tuning of its Triton kernels
    cudnn_benchmark: bool = False
    fuse_qkv: bool = False  # q, k, v projections as one matmul (generation only)
    autotune_gemm: bool = False  # inductor picks each matmul's kernel (cuBLAS or its own Triton) by timing


VARIANTS: dict[str, Variant] = {
    "base": Variant(),
    "fused qkv": Variant(fuse_qkv=True),
    "cudnn.benchmark": Variant(cudnn_benchmark=True),
    "coordinate descent": Variant(descent=True),
    "max-autotune matmuls": Variant(autotune_gemm=True),
}


def _settings(v: Variant) -> None:
    torch._dynamo.reset()
    inductor_config.coordinate_descent_tuning = v.descent
    inductor_config.max_autotune_gemm = v.autotune_gemm
    inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
    torch.backends.cudnn.benchmark = v.cudnn_benchmark


def timed(build: Callable[[], Callable[[], Any]], reps: int) -> tuple[dict[str, float], Any]:
    """Build a step, run it once (the compile), then its median time over ``reps``."""
    t0 = time.perf_counter()
    step = build()
    out = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = 1e3 * cuda_time(step, warmup=3, reps=reps)
    return {"ms": ms, "first_s": first, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/levers.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--only", choices=("gen", "train"), action="append")
    p.add_argument(
        "--variant",
        choices=list(VARIANTS)[1:],
        action="append",
        help="measure these against the base (default: all); each compiles for minutes",
    )
    args = p.parse_args()
    parts = args.only or ["gen", "train"]
    chosen = {"base", *(args.variant or VARIANTS)}
    res: dict[str, Any] = {"env": environment(), "command": " ".join(sys.argv), "batch": args.batch}
    rows: list[dict[str, Any]] = []
    base_out = None
    for part in parts:
        for name, v in VARIANTS.items():
            if name not in chosen or (part == "train" and v.fuse_qkv):
                continue  # fused projections: training's attention modules are the same as generation's
            _settings(v)
            torch.cuda.reset_peak_memory_stats()
            try:
                if part == "gen":
                    row, out = timed(lambda v=v: generation_step(args.batch, False, v.fuse_qkv), reps=10)
                    out = out.float().cpu()
                    if name == "base":
                        base_out = out
                    elif base_out is not None:
                        row["max_abs_diff_to_base"] = float((out - base_out).abs().max())
                else:
                    row, _ = timed(lambda: profile_train.bare_step(args.batch, compile="reduce-overhead"), 20)
                    row["samples_per_s"] = 1e3 * args.batch / row["ms"]
            except Exception:  # a lever that fails is a result too; the others still run
                row = {"error": traceback.format_exc()[-1500:]}
            rows.append({"step": part, "variant": name, **row})
            print(rows[-1], flush=True)
            write_json(args.out, {**res, "rows": rows})
            torch.cuda.empty_cache()
    _settings(VARIANTS["base"])
    print(table(rows, ["step", "variant", "ms", "first_s", "peak_gib", "max_abs_diff_to_base"]))


if __name__ == "__main__":
    main()
