"""Where the GPU time of a batch-8 step goes, by kind of kernel: the compiled generation step
(``--fast``: UNet + one ControlNet on the CFG batch of 16) and the compiled training step (our
ControlNet objective, forward, backward and AdamW), plus scaled-dot-product attention at the
UNet's largest shape with its head size of 40 against 64.

SD1.5 architecture, random weights, bf16, 512 px. The steps run compiled without CUDA graphs so
that the profiler sees each kernel; the sums are GPU time, not wall time.

``--bandwidth`` instead times each of inductor's own (Triton) kernels of one step alone, with the
bytes it reads and writes, through inductor's bandwidth profiler: how far the elementwise and
normalisation work is from the GPU's memory bandwidth, kernel by kernel.

    python benchmarks/profile_kernels.py --out results/kernels   # about 7 min on an H100
    python benchmarks/profile_kernels.py --out results/kernels --bandwidth gen   # a few minutes
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
import profile_train
from common import cuda_time, environment, sd15, table, write_json

from controlnet.families.sd.forward import controlled_unet_forward
from controlnet.model.channels_last_norm import use_channels_last_group_norm
from controlnet.model.control import Control, control_scales
from controlnet.model.fastpath import compile_modules

#: (kind, substrings of a kernel's name), first match wins
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention backward", ("flash_bprop", "fmha_bwd", "flash_bwd", "dot_do_o", "convert_dq")),
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("fused elementwise and norms (inductor)", ("triton",)),
    ("convolution, weight gradient", ("wgrad",)),
    ("convolution, input gradient", ("dgrad",)),
    ("convolution", ("fprop", "implicit_gemm", "conv")),
    ("matmul", ("gemm", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("multi_tensor_apply", "fusedoptimizer", "adam")),
    ("copies", ("copy_kernel", "memcpy")),
)


def kind_of(kernel: str) -> str:
    """The kind of work a GPU kernel's name says it does ("other" when none matches)."""
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def kernel_profile(step: Callable[[], Any], out: Path, n: int = 2) -> dict[str, float]:
    """Milliseconds of GPU time per ``step`` by kind (and "total"); the 40 longest kernels are
    written to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
        sync()
    kinds: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) / n
        if us <= 0 or (not cuda and not e.key.startswith("aten::")):
            continue
        kind = kind_of(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
        kernels.append((us / 1e3, e.count // n, kind, e.key))
    kernels.sort(reverse=True)
    lines = [f"{ms:8.3f} ms {count:5d}x  {kind:38s} {name[:110]}\n" for ms, count, kind, name in kernels]
    out.write_text("".join(lines[:40]))
    ordered = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return {**ordered, "total": sum(kinds.values())}


def bandwidth_profile(build: Callable[[], Callable[[], Any]]) -> list[dict[str, Any]]:
    """Each inductor Triton kernel that one call of the step built by ``build`` runs: its calls,
    milliseconds per call (timed alone), gigabytes read and written per call and the GB/s that
    makes, longest total first. Inductor's bandwidth profiler is switched on for the compile
    (``build`` must compile lazily, as torch.compile does) and the numbers it collects per
    compiled graph are gathered; it times each kernel on its first call, so the step's results
    are not to be used."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime import triton_heuristics

    calls: list[tuple[float, float, float, str]] = []
    end_graph = triton_heuristics.end_graph
    triton_heuristics.end_graph = lambda output_file: calls.extend(triton_heuristics.collected_calls)
    inductor_config.profile_bandwidth = True
    try:
        step = build()
        step()  # compiles, and times every kernel once
        torch.cuda.synchronize()
        calls.clear()
        step()
        torch.cuda.synchronize()
    finally:
        inductor_config.profile_bandwidth = False
        triton_heuristics.end_graph = end_graph
    kernels: dict[str, dict[str, Any]] = {}
    for ms, gb, _, name in calls:
        k = kernels.setdefault(name, {"kernel": name, "calls": 0, "ms_per_call": ms, "gb_per_call": gb})
        k["calls"] += 1
    rows = sorted(kernels.values(), key=lambda k: -k["calls"] * k["ms_per_call"])
    for k in rows:
        k["total_ms"] = k["calls"] * k["ms_per_call"]
        k["gb_per_s"] = k["gb_per_call"] / (k["ms_per_call"] / 1e3)
    return rows


def fuse_qkv_projections(module: torch.nn.Module) -> int:
    """Merge the q, k and v projections of every diffusers attention in ``module`` into one
    linear layer (k and v for cross-attention) and switch it to the fused processor; the number of
    attentions changed."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.fuse_projections(fuse=True)
            m.set_processor(FusedAttnProcessor2_0())
            n += 1
    return n


def generation_step(
    batch: int, smoke: bool, fuse_qkv: bool = False, channels_last_norm: bool = False
) -> Callable[[], torch.Tensor]:
    """One compiled denoising step of UNet + ControlNet on a CFG batch of ``2 * batch``; it
    returns the UNet's output. ``fuse_qkv`` first merges each attention's projections into one
    matmul; ``channels_last_norm`` normalises with training's channels-last GroupNorm."""
    dev = "cpu" if smoke else "cuda"
    base, cns = sd15(dev, torch.float32 if smoke else torch.bfloat16, n_controlnets=1, smoke=smoke)
    for m in (base.unet, cns[0]):
        if fuse_qkv:
            fuse_qkv_projections(m)
        if channels_last_norm:
            use_channels_last_group_norm(m)
    if not smoke:
        compile_modules([base.unet, cns[0]])
    g = torch.Generator().manual_seed(0)
    size = 64 if smoke else 512
    x = torch.randn(2 * batch, 4, size // 8, size // 8, generator=g).to(dev, base.dtype)
    context = torch.randn(2 * batch, 77, 768, generator=g).to(dev, base.dtype)
    cond = torch.rand(1, 3, size, size, generator=g).to(dev, base.dtype)
    with torch.no_grad():
        control = Control(cns[0], cns[0].encode_hint(cond), control_scales(cns[0].num_residuals))
    t = torch.tensor(500.0, device=dev)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return controlled_unet_forward(base.unet, x, t, context, [control], cfg_batch=True)

    return step


def attention_times(shape: tuple[int, int, int], head_sizes: tuple[int, ...] = (40, 64)) -> list[dict]:
    """Forward and forward+backward time of scaled-dot-product attention (PyTorch's default
    kernel choice) at (batch, heads, tokens), for each head size."""
    rows = []
    b, h, n = shape
    for d in head_sizes:
        qkv = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in "qkv"]
        with torch.no_grad():
            fwd = cuda_time(lambda qkv=qkv: F.scaled_dot_product_attention(*qkv), warmup=3, reps=20)
        both = cuda_time(
            lambda qkv=qkv: F.scaled_dot_product_attention(*qkv).sum().backward(), warmup=3, reps=10
        )
        tflop = 4 * b * h * n * n * d / 1e12  # QK^T and PV, forward
        rows.append(
            {
                "shape": f"{b}x{h}x{n}x{n}, head size {d}",
                "forward_ms": 1e3 * fwd,
                "forward_tflops": tflop / fwd,
                "forward_backward_ms": 1e3 * both,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/kernels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script")
    p.add_argument(
        "--bandwidth",
        choices=("gen", "train"),
        action="append",
        help="instead: each inductor kernel's time and GB/s in this step (CUDA only)",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"env": environment(), "command": " ".join(sys.argv), "batch": args.batch}
    if args.bandwidth:
        builds = {
            "gen": lambda: generation_step(args.batch, False),
            "train": lambda: profile_train.bare_step(args.batch, compile="default"),
        }
        for part in args.bandwidth:
            rows = bandwidth_profile(builds[part])
            ms, gb = sum(r["total_ms"] for r in rows), sum(r["calls"] * r["gb_per_call"] for r in rows)
            res[part] = {"total_ms": ms, "total_gb": gb, "kernels": rows}
            write_json(out / "bandwidth.json", res)
            print(f"{part}: {len(rows)} kernels, {ms:.2f} ms, {gb:.2f} GB, {1e3 * gb / ms:.0f} GB/s overall")
            print(table(rows[:40], ["kernel", "calls", "ms_per_call", "gb_per_call", "gb_per_s", "total_ms"]))
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        return
    rows: list[dict[str, Any]] = []

    def profiled(name: str, step: Callable[[], Any], file: str) -> None:
        for _ in range(3):  # compile, then warm
            step()
        kinds = kernel_profile(step, out / file)
        for kind, ms in kinds.items():
            rows.append({"step": name, "kind": kind, "ms": ms, "share": ms / kinds["total"]})
            print(rows[-1], flush=True)
        write_json(out / "kernels.json", {**res, "rows": rows})

    profiled("generation, --fast, CFG batch", generation_step(args.batch, args.smoke), "generation.txt")
    if not args.smoke:
        train_step = profile_train.bare_step(args.batch, compile="default")
        profiled("training, ControlNet, compiled", train_step, "train.txt")
        del train_step
        res["attention"] = attention_times((2 * args.batch, 8, 4096)) + attention_times((args.batch, 8, 4096))
        write_json(out / "kernels.json", {**res, "rows": rows})
        print(table(res["attention"], ["shape", "forward_ms", "forward_tflops", "forward_backward_ms"]))
    print()
    print(table(rows, ["step", "kind", "ms", "share"]))


if __name__ == "__main__":
    main()
