"""Inductor and cuDNN settings (coordinate-descent tuning, matmul autotuning, frozen weights, tiling
and fusion choices), fused attention projections and the channels-last GroupNorm, against the
batch-8 steps of profile_kernels.py: the ``--fast`` generation step (UNet + one ControlNet on the
CFG batch of 16, compiled) and the compiled training step (reduce-overhead). Each variant is
compiled afresh in this process and timed against the base of the same process: the generation
variants captured as CUDA graphs and timed in turn, round after round, their outputs compared with
the base's; the training variants one after the other.

SD1.5 architecture, random weights, bf16, 512 px.

    python benchmarks/levers.py --out results/levers.json   # everything: well over an hour on an H100
    python benchmarks/levers.py --only gen                  # a part: gen or train
    python benchmarks/levers.py --only gen --variant "coordinate descent"   # base and one: 8 min
"""

from __future__ import annotations

import argparse
import functools
import statistics
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

from controlnet.model.fastpath import GraphCache


@dataclass(frozen=True)
class Variant:
    inductor: tuple[tuple[str, Any], ...] = ()  # inductor settings (dotted names) for the compile
    cudnn_benchmark: bool = False
    fuse_qkv: bool = False  # q, k, v projections as one matmul (generation only)
    channels_last_norm: bool = False  # training's channels-last GroupNorm (generation only)

    @property
    def generation_only(self) -> bool:
        """Training's attention modules are generation's (so no fused projections), it never
        freezes its weights, and it always normalises channels-last."""
        return self.fuse_qkv or self.channels_last_norm or ("freezing", True) in self.inductor


#: inductor's matmul autotuning: each matmul's kernel (cuBLAS or inductor's own Triton template,
#: into which it can fuse the elementwise work around it) picked by timing the candidates
_AUTOTUNE = (("max_autotune_gemm", True), ("max_autotune_gemm_backends", "ATEN,TRITON"))

VARIANTS: dict[str, Variant] = {
    "base": Variant(),
    "fused qkv": Variant(fuse_qkv=True),
    "cudnn.benchmark": Variant(cudnn_benchmark=True),
    # inductor's coordinate-descent tuning of its Triton kernels
    "coordinate descent": Variant(inductor=(("coordinate_descent_tuning", True),)),
    # with the convolutions' candidates too (inductor's default): a compile of over 20 minutes
    "max-autotune matmuls": Variant(inductor=_AUTOTUNE),
    "max-autotune matmuls, cuDNN convolutions": Variant(
        inductor=(*_AUTOTUNE, ("max_autotune_conv_backends", "ATEN"))
    ),
    # weights compiled in as constants, so that work on them is folded at compile time
    "freezing": Variant(inductor=(("freezing", True),)),
    "channels-last GroupNorm": Variant(channels_last_norm=True),
    # pointwise kernels and reductions tiled over two or three dimensions where their inputs and
    # outputs are in different layouts (a channels-last tensor read in NCHW order)
    "n-d tiling": Variant(inductor=(("triton.prefer_nd_tiling", True), ("triton.tile_reductions", True))),
    # fusion of kernels that share inputs even without a producer-consumer edge between them
    "aggressive fusion": Variant(inductor=(("aggressive_fusion", True),)),
    # each fusion decision that may not pay kept only if its fused kernel times faster
    "benchmark fusion": Variant(inductor=(("benchmark_fusion", True),)),
}

_INDUCTOR_DEFAULTS = inductor_config.get_config_copy()


def _settings(v: Variant) -> None:
    """Forget what was compiled before; settings for the next compile."""
    torch._dynamo.reset()
    inductor_config.load_config(_INDUCTOR_DEFAULTS)
    for name, value in v.inductor:
        *path, attr = name.split(".")
        setattr(functools.reduce(getattr, path, inductor_config), attr, value)
    torch.backends.cudnn.benchmark = v.cudnn_benchmark


def timed(build: Callable[[], Callable[[], Any]], reps: int) -> dict[str, float]:
    """Build a step, run it once (the compile), then its median time over ``reps``."""
    t0 = time.perf_counter()
    step = build()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = 1e3 * cuda_time(step, warmup=3, reps=reps)
    return {"ms": ms, "first_s": first, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def generation_levers(names: list[str], batch: int, rounds: int = 7, reps: int = 10) -> list[dict[str, Any]]:
    """Each variant's generation step compiled afresh and captured as a CUDA graph, as ``--fast``
    replays it, then all of them timed in turn, ``rounds`` times: drift of the machine over the
    minutes the compiles take (single figures move by 7% between processes) falls on every variant
    alike. ms: the median over the rounds. Dynamo is reset before each compile (without it, a
    setting that leaves its guards as they were would reuse the code compiled before); the graphs
    captured before keep running, which the end checks: each replays its first output again."""
    steps, rows, firsts, base_out = {}, {}, {}, None
    for name in names:
        v = VARIANTS[name]
        _settings(v)
        t0 = time.perf_counter()
        try:
            step = generation_step(batch, False, v.fuse_qkv, v.channels_last_norm)
            graphs = GraphCache(torch.device("cuda"))
            steps[name] = lambda step=step, graphs=graphs: graphs.run("step", lambda _: step(), {})
            out = steps[name]().float().cpu()
        except Exception:  # a lever that fails is a result too; the others still run
            rows[name] = {"step": "gen", "variant": name, "error": traceback.format_exc()[-1500:]}
            steps.pop(name, None)
            continue
        rows[name] = {"step": "gen", "variant": name, "first_s": time.perf_counter() - t0}
        firsts[name] = out
        if base_out is None:
            base_out = out
        else:
            rows[name]["max_abs_diff_to_base"] = float((out - base_out).abs().max())
        print(rows[name], flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(1e3 * cuda_time(step, warmup=1, reps=reps))
    for name, step in steps.items():
        rows[name]["ms"] = statistics.median(times[name])
        rows[name]["ms_rounds"] = times[name]
        rows[name]["replays_first_output"] = torch.equal(step().float().cpu(), firsts[name])
    _settings(VARIANTS["base"])
    return list(rows.values())


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
    for part in parts:
        names = [n for n, v in VARIANTS.items() if n in chosen and (part == "gen" or not v.generation_only)]
        if part == "gen":
            rows += generation_levers(names, args.batch)
            write_json(args.out, {**res, "rows": rows})
            continue
        for name in names:
            _settings(VARIANTS[name])
            torch.cuda.reset_peak_memory_stats()
            try:
                row = timed(lambda: profile_train.bare_step(args.batch, compile="reduce-overhead"), 20)
                row["samples_per_s"] = 1e3 * args.batch / row["ms"]
            except Exception:  # a lever that fails is a result too; the others still run
                row = {"error": traceback.format_exc()[-1500:]}
            rows.append({"step": part, "variant": name, **row})
            print(rows[-1], flush=True)
            write_json(args.out, {**res, "rows": rows})
            torch.cuda.empty_cache()
    _settings(VARIANTS["base"])
    cols = ["step", "variant", "ms", "first_s", "peak_gib", "max_abs_diff_to_base", "replays_first_output"]
    print(table(rows, cols))


if __name__ == "__main__":
    main()
