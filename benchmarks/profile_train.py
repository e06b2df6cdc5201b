"""Where a training step's time goes: our ControlNet objective in a bare loop (no data loader, no
accelerate, the batch already on the GPU) under several settings, against the diffusers recipe's
step, with a torch.profiler table of the eager step (the GPU's busy time against the wall time says
whether the step is bound by the GPU or by launching kernels from Python), and the compiled step
captured whole as one CUDA graph, with and without the UNet's encoder beside the ControlNet.

SD1.5 architecture, random weights, batch 8 at 512 px, bf16 autocast, fused AdamW.

    python benchmarks/profile_train.py --out results/profile   # about 10 min on an H100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_train
from common import cuda_time, environment, sd15, table, write_json

from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.sd.forward import controlled_unet_forward
from controlnet.model.control import Control, control_scales
from controlnet.model.fastpath import compile_modules
from controlnet.training.objectives import BaseObjective, ControlNetObjective, StepNoise, as_condition


def _setup(
    batch: int, *, channels_last: bool = False, compile: str | None = None, finetune: bool = False
) -> tuple[BaseObjective | ControlNetObjective, list[torch.nn.Parameter], dict[str, Any]]:
    """An objective prepared as ``train`` prepares it, its trainable parameters and a batch on the
    GPU (what a cached latent data set yields)."""
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
    g = torch.Generator().manual_seed(0)
    data: dict[str, Any] = {
        "latent_mean": torch.randn(batch, 4, 64, 64, generator=g),
        "latent_std": torch.full((batch, 4, 64, 64), 0.1),
        "cond": torch.randint(0, 256, (batch, 3, 512, 512), generator=g, dtype=torch.uint8),
        "context": torch.randn(batch, 77, 768, generator=g),
    }
    data = {k: v.cuda() for k, v in data.items()} | {"prompt": ["x"] * batch}
    return objective, [p for p in objective.parameters() if p.requires_grad], data


def bare_step(
    batch: int, *, channels_last: bool = False, compile: str | None = None, finetune: bool = False
) -> Callable[[], None]:
    """One optimizer step of our objective, as ``train`` runs it, minus the loop around it."""
    objective, params, data = _setup(batch, channels_last=channels_last, compile=compile, finetune=finetune)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
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


def graph_step(batch: int, *, concurrent: bool = False) -> Callable[[], None]:
    """The ControlNet step compiled in inductor's default mode and captured whole - forward,
    backward and a capturable AdamW - as one CUDA graph (the alternative to reduce-overhead's graph
    per network and pass); the step's random inputs are drawn outside it and copied in.
    ``concurrent``: the UNet's encoder half runs beside the ControlNet on a side stream."""
    objective, params, data = _setup(batch, compile="default")
    assert isinstance(objective, ControlNetObjective)
    unet, cn = objective.model.unet, objective.controlnet
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-5, device="cuda"), fused=True, capturable=True)
    count = [0]

    def inputs() -> list[torch.Tensor]:
        count[0] += 1
        noise = StepNoise(0, count[0], 0, batch, slice(0, batch), "cuda")
        noisy, t, emb, target = objective.inputs(data, noise)
        return [noisy.to(unet.dtype), t, emb.context, as_condition(data["cond"]), target]

    static = [x.clone() for x in inputs()]

    def forward_backward() -> None:
        noisy, t, context, cond, target = static
        with torch.autocast("cuda", torch.bfloat16):
            control = Control(cn, cn.encode_hint(cond), control_scales(cn.num_residuals))
            pred = controlled_unet_forward(unet, noisy, t, context, [control], concurrent=concurrent)
            loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compilation and warm-up, outside the capture
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients every replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward()

    def step() -> None:
        for dst, src in zip(static, inputs()):
            dst.copy_(src)
        graph.replay()

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
    res = {"env": environment(), "command": " ".join(sys.argv)}

    def add(name: str, **kw: Any) -> None:
        rows.append({"run": name, "batch": args.batch, **kw})
        print(rows[-1], flush=True)
        write_json(out / "profile.json", {**res, "rows": rows})  # so far: a run cut short keeps its rows

    def timed(name: str, step: Callable[[], None], warmup: int = 3) -> Callable[[], None]:
        s = cuda_time(step, warmup=warmup, reps=10)
        add(name, samples_per_s=args.batch / s, ms=1000 * s, peak_gib=bench_train._peak())
        return step

    r = bench_train.peer(args.batch, checkpointing=False)
    add("diffusers recipe step", samples_per_s=r["samples_per_s"], peak_gib=r["peak_gib"])
    step = timed("ours, eager", bare_step(args.batch))
    add("ours, eager (profiled)", **profile(step, out / "eager.txt"))
    del step
    torch.backends.cudnn.benchmark = True
    timed("ours, eager, cudnn.benchmark", bare_step(args.batch))
    torch.backends.cudnn.benchmark = False
    timed("ours, eager, channels-last", bare_step(args.batch, channels_last=True))
    timed("ours, full-UNet fine-tuning, eager", bare_step(args.batch, finetune=True))
    for mode in ("default", "reduce-overhead"):
        timed(f"ours, --compile {mode}", bare_step(args.batch, compile=mode), warmup=4)
    for concurrent in (False, True):
        beside = ", UNet encoder beside the ControlNet" if concurrent else ""
        step = graph_step(args.batch, concurrent=concurrent)
        timed(f"ours, --compile default, whole step one CUDA graph{beside}", step)
        del step
    print()
    print(table(rows, ["run", "batch", "samples_per_s", "ms", "peak_gib", "gpu_busy_ms"]))


if __name__ == "__main__":
    main()
