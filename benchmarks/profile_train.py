"""Where a training step's time goes: our ControlNet objective in a bare loop (no data loader, no
accelerate, the batch already on the GPU) under several settings, against the diffusers recipe's
step, with a torch.profiler table of the eager step (the GPU's busy time against the wall time says
whether the step is bound by the GPU or by launching kernels from Python).

SD1.5 architecture, random weights, batch 8 at 512 px, bf16 autocast, fused AdamW.

    python benchmarks/profile_train.py --out results/profile   # about 5 min on an H100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train
from common import cuda_time, environment, sd15, table, write_json

from controlnet.fastpath import compile_modules
from controlnet.models import PromptEmbeddings
from controlnet.objectives import BaseObjective, ControlNetObjective, StepNoise


def bare_step(
    batch: int, *, channels_last: bool = False, compile: str | None = None, finetune: bool = False
) -> Callable[[], None]:
    """One optimizer step of our objective, as ``train`` runs it, minus the loop around it."""
    bench_train._reset()
    base, cns = sd15("cuda", torch.bfloat16)
    objective: BaseObjective | ControlNetObjective
    if finetune:
        objective = BaseObjective(base, train_text_encoder=False)
    else:
        objective = ControlNetObjective(base, cns[0].float())
    objective.inputs.empty = PromptEmbeddings(torch.zeros(1, 77, 768))
    objective.prepare(torch.device("cuda"), torch.bfloat16)
    if channels_last:
        for m in objective.networks():
            m.to(memory_format=torch.channels_last)
    if compile:
        compile_modules(objective.networks(), mode=compile, training=True)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(0)
    data: dict[str, Any] = {
        "latent_mean": torch.randn(batch, 4, 64, 64, generator=g),
        "latent_std": torch.full((batch, 4, 64, 64), 0.1),
        "cond": torch.randint(0, 256, (batch, 3, 512, 512), generator=g, dtype=torch.uint8),
        "context": torch.randn(batch, 77, 768, generator=g),
    }
    data = {k: v.cuda() for k, v in data.items()} | {"prompt": ["x"] * batch}
    count = [0]

    def step() -> None:
        count[0] += 1
        if compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        noise = StepNoise(0, count[0], 0, batch, slice(0, batch), "cuda")
        with torch.autocast("cuda", torch.bfloat16):
            loss = objective(data, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile(step: Callable[[], None], out: Path, n: int = 3) -> dict[str, float]:
    """GPU busy time and wall time per step, and the top kernels, into ``out``."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    averages = p.key_averages()
    out.write_text(averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
    busy = sum(e.self_device_time_total for e in averages) / n / 1e6
    return {"gpu_busy_ms": 1000 * busy, "wall_ms_profiled": 1000 * wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/profile")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def add(name: str, **kw: Any) -> None:
        rows.append({"run": name, "batch": args.batch, **kw})
        print(rows[-1], flush=True)

    def timed(name: str, **kw: Any) -> Callable[[], None]:
        step = bare_step(args.batch, **kw)
        s = cuda_time(step, warmup=4 if kw.get("compile") else 3, reps=10)
        peak = bench_train._peak()
        add(name, samples_per_s=args.batch / s, ms=1000 * s, peak_gib=peak)
        return step

    r = bench_train.peer(args.batch, checkpointing=False)
    add("diffusers recipe step", samples_per_s=r["samples_per_s"], peak_gib=r["peak_gib"])
    step = timed("ours, eager")
    add("ours, eager (profiled)", **profile(step, out / "eager.txt"))
    del step
    torch.backends.cudnn.benchmark = True
    timed("ours, eager, cudnn.benchmark")
    torch.backends.cudnn.benchmark = False
    timed("ours, eager, channels-last")
    timed("ours, full-UNet fine-tuning, eager", finetune=True)
    timed("ours, --compile default", compile="default")
    timed("ours, --compile reduce-overhead", compile="reduce-overhead")
    write_json(out / "profile.json", {"env": environment(), "command": " ".join(sys.argv), "rows": rows})
    print()
    print(table(rows, ["run", "batch", "samples_per_s", "ms", "peak_gib", "gpu_busy_ms"]))


if __name__ == "__main__":
    main()
