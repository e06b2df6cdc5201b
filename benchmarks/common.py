"""Shared pieces of the GPU benchmarks: SD1.5-shaped models with random weights, timing, peaks.

Random weights of the real shapes do the real arithmetic and move the real bytes, so the timings
are those of the released models. Zero-initialised layers get small random values so that nothing
is timed on zeros.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from controlnet import ControlNet, ControlNetConfig, Family, unet_config
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import tiny_unet_config
from controlnet.model import qk_kernel
from controlnet.model.fused import kernel_state
from controlnet.text.tokenizer import clip_tokenizer

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


@contextmanager
def built_in(dtype: torch.dtype, device: str) -> Iterator[None]:
    """Modules made within are made in ``dtype`` on ``device`` (a model of 20 billion parameters
    does not fit an 80 GB card in float32 on its way to bf16)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def open_zero(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero parameter small random values (nothing is timed on zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p))


#: --smoke: tiny shapes on the CPU, to check a benchmark script end to end without a GPU
SMOKE = {
    "unet": {**tiny_unet_config(Family.SD1, cross_attention_dim=768), "sample_size": 64},
    "vae": {**SD_VAE, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
}


def sd15(
    device: str, dtype: torch.dtype, n_controlnets: int = 1, seed: int = 0, smoke: bool = False
) -> tuple[UNetBase, list[ControlNet]]:
    """An SD1.5-shaped base model (a 1-layer text encoder: prompts are pre-encoded in timings) and
    ControlNets copied from its UNet, random weights, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SMOKE["unet"] if smoke else unet_config(Family.SD1)))
        vae = AutoencoderKL(**(SMOKE["vae"] if smoke else SD_VAE))
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                num_hidden_layers=1,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=77,
            )
        )
    cns = []
    for i in range(n_controlnets):
        cn = ControlNet.from_unet(
            unet, ControlNetConfig(hint_block_channels=(4, 8, 8, 16)) if smoke else None
        )
        open_zero(cn, seed + 1 + i)
        cns.append(cn.to(dtype).eval())
    base = UNetBase(Family.SD1, unet, vae, text, clip_tokenizer(Family.SD1)).to(device, dtype)
    return base, cns


def diffusers_controlnet(unet: UNet2DConditionModel, cn: ControlNet) -> torch.nn.Module:
    """Diffusers' ``ControlNetModel`` holding ``cn``'s weights (our state-dict keys are its keys: a
    strict load), on ``cn``'s device and dtype, for the peer's pipelines."""
    from diffusers import ControlNetModel

    theirs = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=cn.config.hint_block_channels
    )
    theirs.load_state_dict(cn.state_dict())
    return theirs.to(cn.device, cn.dtype).eval()


def flow_denoise(
    base: Any,
    cond: Any,
    uncond: Any,
    units: list[Any],
    latent_size: tuple[int, int],
    steps: int,
    guidance: float,
    *,
    cuda_graphs: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Our denoising as each transformer benchmark times it: from prompt embeddings, Euler over
    the family's schedule, seed 0, no progress bar; the final latents."""
    from controlnet.generation.sampling import denoise

    return denoise(
        base,
        cond,
        uncond,
        units,
        sampler="euler",
        timestep_spacing="default",
        steps=steps,
        guidance=guidance,
        eta=0.0,
        seeds=[0],
        latent_size=latent_size,
        progress=False,
        cuda_graphs=cuda_graphs,
        compile=compile,
    ).latents


def cuda_time(fn: Callable[[], Any], warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of ``fn`` in seconds, synchronising the GPU around each run."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate on random data (the ceiling to compare achieved rates with)."""
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    s = cuda_time(lambda: a @ b, warmup=3, reps=10)
    return 2 * n**3 / s / 1e12


def environment() -> dict[str, Any]:
    import diffusers

    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.split("\n")[0]
            .strip()
        )  # one line per GPU: the first
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "driver": driver,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def epilogue_gelu_agreement(device: str) -> dict[str, float] | None:
    """How far the GELU our blocks run in a product's epilogue (``fused.linear_gelu``, on a GPU)
    is from the tanh-approximate GELU the models were trained with, and from the exact one, in
    float32 (a check that the epilogue is the approximation: the second must be much the larger)."""
    if device != "cuda":
        return None
    import torch.nn.functional as F

    from controlnet.model.fused import linear_gelu

    g = torch.Generator(device="cuda").manual_seed(0)
    linear = torch.nn.Linear(256, 512, device="cuda")
    x = torch.randn(4, 1024, 256, device="cuda", generator=g)
    with torch.no_grad():
        y, z = linear_gelu(linear, x), linear(x)
        return {
            "max |diff| vs tanh GELU": float((y - F.gelu(z, approximate="tanh")).abs().max()),
            "max |diff| vs exact GELU": float((y - F.gelu(z)).abs().max()),
        }


def transformer_bench_args(
    doc: str | None, *, steps: int = 28, size: int = 1024, guidance: float | None = None
) -> argparse.Namespace:
    """The flags of the transformer families' generation benchmarks (bench_flux, bench_sd3,
    bench_qwenimage, bench_zimage), with the family's default steps and size; ``guidance``: a
    --guidance flag with that default, for a benchmark that takes one."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--peer", action="store_true", help="time diffusers' pipeline in the same run")
    p.add_argument("--peer-compile", action="store_true", help="also diffusers with its blocks compiled")
    p.add_argument("--fast", action="store_true", help="also our --fast path (blocks compiled)")
    p.add_argument("--profile", action="store_true", help="GPU time of one step by kind of kernel")
    p.add_argument("--fp8", action="store_true", help="last, ours with FP8 weights and products")
    p.add_argument("--tiny", action="store_true", help="a few-channel model on the CPU (checks the script)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--size", type=int, default=size)
    if guidance is not None:
        p.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance (1: none)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--no-qk-kernel", action="store_true", help="ours with the compiled query/key group, not the kernel"
    )
    args = p.parse_args()
    qk_kernel.ENABLED = qk_kernel.ENABLED and not args.no_qk_kernel
    return args


#: ours(steps, cuda_graphs=None, compile=False) -> final latents
Ours = Callable[..., torch.Tensor]
#: builds diffusers' pipeline once; returns the call to time and the modules it runs every step
Peer = Callable[[], tuple[Callable[[], torch.Tensor], list[torch.nn.Module]]]


def compare_generation(
    args: argparse.Namespace,
    device: str,
    dtype: torch.dtype,
    size: int,
    ours: Ours,
    peer: Peer | None,
    *,
    blocks: tuple[type[torch.nn.Module], ...],
    release: Callable[[], None],
    fp8: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time our generation for ``args.steps`` steps: eager, by default (each step one CUDA graph)
    and, with ``--fast``, compiled; with ``--peer`` diffusers' pipeline (``--peer-compile``: its
    ``blocks`` compiled one by one, as diffusers' regional compilation does) over the same weights.
    One step's arithmetic is counted (a two-step run of ours less a one-step run, so one-off work
    such as the condition's VAE pass is left out) against the matmul peak of the same run. Prints
    the table and each row's agreement with the first, writes the record to ``args.out``.
    ``release()`` frees what a row kept (graphs), so that each row's peak memory is its own;
    ``fp8()`` turns our networks to FP8 weights for a last row (``--fp8``), compiled with ``--fast``."""
    from torch.utils.flop_counter import FlopCounterMode, mm_flop

    # a product with its activation in the epilogue (fused.linear_gelu) is still a product: torch's
    # counter knows addmm but not _addmm_activation
    def addmm_activation(bias: Any, a: Any, b: Any, *_: Any, **__: Any) -> int:
        return mm_flop(a, b)

    counts = []
    for steps in (1, 2):
        mapping = {torch.ops.aten._addmm_activation: addmm_activation}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
            ours(steps, cuda_graphs=False)
        counts.append(float(counter.get_total_flops()))
    flops, peak = counts[1] - counts[0], matmul_peak_tflops()
    rows: list[dict[str, Any]] = []
    outs: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {
        "environment": environment(),
        "steps": args.steps,
        "size": size,
        "dtype": str(dtype),
        "epilogue_gelu": epilogue_gelu_agreement(device),
    }
    print("GELU in the product's epilogue:", record["epilogue_gelu"])

    def timed(name: str, fn: Callable[[], torch.Tensor]) -> None:
        release()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        result["out"] = fn()  # the first call: graph capture, compilation
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        seconds = cuda_time(lambda: result.update(out=fn()), warmup=0, reps=args.reps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        outs[name] = result["out"].float()
        rows.append(
            {
                "path": name,
                "s/image": round(seconds, 3),
                "ms/step": round(1000 * seconds / args.steps, 1),
                "TFLOP/s": round(flops * args.steps / seconds / 1e12, 1),
                "peak GiB": round(mem, 1),
                "first call s": round(first, 1),
            }
        )
        print(f"{name}: {seconds:.3f} s/image, peak {mem:.1f} GiB, first call {first:.1f} s", flush=True)

    def profiled(name: str) -> None:
        if args.profile:
            from profile_kernels import kernel_profile

            where = Path(args.out or "profile").with_suffix(f".{name}.kernels.txt")
            where.parent.mkdir(parents=True, exist_ok=True)
            kinds = kernel_profile(lambda: ours(1, cuda_graphs=False, compile=name == "compiled"), where)
            record.setdefault("kernel_ms_per_step", {})[name] = kinds
            print(
                f"GPU time of one step ({name}), ms: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items())
            )

    timed("ours eager", lambda: ours(args.steps, cuda_graphs=False))
    record["fused_kernels"] = kernel_state()  # each fused group: compiled, or unfused (no compiler)
    print("fused kernels:", record["fused_kernels"])
    profiled("eager")
    timed("ours (default)", lambda: ours(args.steps))
    if peer is not None:
        call, modules = peer()
        timed("diffusers eager", call)
        if args.peer_compile:
            for block in (b for m in modules for b in m.modules() if isinstance(b, blocks)):
                block.compile(fullgraph=True)
            timed("diffusers compiled", call)
    if args.fast:
        timed("ours --fast", lambda: ours(args.steps, compile=True))
        profiled("compiled")
        from torch._dynamo.utils import counters

        record["compiled_graphs"] = dict(counters["stats"])  # one per kind of block: no recompiles
    if args.fp8 and fp8 is not None:
        fp8()
        timed("ours fp8" + (" --fast" if args.fast else ""), lambda: ours(args.steps, compile=args.fast))
    release()
    reference = rows[0]["path"]
    for row in rows:
        diff = outs[row["path"]] - outs[reference]
        row[f"max |diff| vs {reference}"] = float(diff.abs().max())
        row["rel. L2"] = float(diff.norm() / outs[reference].norm())
    record.update(rows=rows, step_tflop=flops / 1e12, matmul_peak_tflops=peak)
    if "diffusers eager" in outs:
        record["max_abs_diff"] = float((outs["ours (default)"] - outs["diffusers eager"]).abs().max())
    record["floor_s"] = flops * args.steps / (peak * 1e12) if peak == peak else None
    columns = ["path", "s/image", "ms/step", "TFLOP/s", "peak GiB", "first call s"]
    print(table(rows, [*columns, f"max |diff| vs {reference}", "rel. L2"]))

    print(f"per step: {flops / 1e12:.2f} TFLOP; bf16 matmul peak {peak:.0f} TFLOP/s", end="")
    print(f"; floor {record['floor_s']:.2f} s per image" if record["floor_s"] else "")
    if "max_abs_diff" in record:
        print(f"ours vs diffusers: max |difference| of the final latents {record['max_abs_diff']:.3g}")
    write_json(args.out, record)
    return record
