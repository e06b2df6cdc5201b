"""Training speed and memory: our loop against diffusers' train_controlnet.py recipe.

SD1.5 architecture, random weights, batch 8 at 512 px (64x64 latents), bf16 mixed precision. Our
numbers come from the real ``controlnet.training.train.train`` loop on batches of cached latents and prompt
embeddings (the recipe's timing likewise starts from latents and embeddings); the peer is the
recipe's step (frozen bf16 UNet, fp32 diffusers ControlNetModel under autocast, AdamW) in this
same process. Also our full-UNet fine-tuning step, the paper's reference for ControlNet's cost.

    python benchmarks/bench_train.py --out results/train.json [--peer] [--compile [--compile-mode M,...]]
        [--no-eager] [--finetune] [--checkpointing] [--batch 8]
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_time, environment, open_zero, sd15, table, write_json

from controlnet.families.protocol import PromptEmbeddings
from controlnet.training.objectives import BaseObjective, ControlNetObjective
from controlnet.training.train import TrainConfig, train


class CachedLike(Dataset):
    """Items shaped like a latent cache's: posterior moments, a uint8-sourced condition, a context
    (SD1.5's by default) and added conditions of the given widths (a transformer's pooled text)."""

    def __init__(
        self,
        n: int,
        size: int = 512,
        *,
        latent: tuple[int, int] = (4, 8),  # (channels, the VAE's downsampling)
        context: tuple[int, int] = (77, 768),
        added: dict[str, int] | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(0)
        channels, factor = latent
        self.mean = torch.randn(n, channels, size // factor, size // factor, generator=g)
        self.cond = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.context = torch.randn(n, *context, generator=g)
        self.added = {k: torch.randn(n, width, generator=g) for k, width in (added or {}).items()}

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "latent_mean": self.mean[i],
            "latent_std": torch.full_like(self.mean[i], 0.1),
            "cond": self.cond[i],  # uint8, as a latent cache stores it (the objective divides)
            "context": self.context[i],
            **({"added": {k: v[i] for k, v in self.added.items()}} if self.added else {}),
            "prompt": "x",
            "index": i,
        }


SMOKE = False


def _reset() -> None:
    torch._dynamo.reset()  # each run compiles its own models: no cache limits carried over
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def logged_rates(run_dir: str | Path) -> list[float]:
    """The samples/s a run logged, window by window (NaN on a process other than the main one of a
    distributed run, which logs nothing)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return [math.nan, math.nan]
    with open(Path(run_dir) / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "samples_per_s"]


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def ours(
    kind: str, batch: int, steps: int, *, compile: str | None, checkpointing: bool, out: str | None = None
) -> dict[str, float]:
    """Our loop (per process: ``batch``; the rate is the whole run's, over all processes);
    ``compile``: None (eager) or a torch.compile mode; ``out``: the run folder (every process of
    a distributed run must name the same one), a temporary one when None."""
    _reset()
    base, cns = sd15("cpu" if SMOKE else "cuda", torch.bfloat16, n_controlnets=1, smoke=SMOKE)
    if kind == "controlnet":
        objective = ControlNetObjective(base, cns[0].float())
    else:  # full-UNet fine-tuning on the same inputs (the text encoder stays frozen)
        objective = BaseObjective(base, train_text_encoder=False)
    objective.inputs.empty = PromptEmbeddings(torch.zeros(1, 77, 768))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        out = out or tmp
        cfg = TrainConfig(
            out=out,
            cpu=SMOKE,
            steps=steps,
            batch_size=batch,
            lr=1e-5,
            mixed_precision="bfloat16",
            compile=compile is not None,
            compile_mode=compile or "default",  # (not used when eager)
            gradient_checkpointing=checkpointing,
            log_every=steps // 3,
            save_checkpoints=False,
            num_workers=4,
            progress=False,
        )
        train(cfg, objective, CachedLike(batch * 8))
        rates = logged_rates(out)
    peak = _peak()
    del objective, base, cns
    return {"samples_per_s": sum(rates[1:]) / len(rates[1:]), "peak_gib": peak}  # first window: warm-up


def peer(batch: int, *, checkpointing: bool) -> dict[str, float]:
    """diffusers' examples/controlnet/train_controlnet.py step, as published."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlnet import Family, unet_config

    _reset()
    dtype = torch.bfloat16
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**unet_config(Family.SD1))
    unet = unet.to(dtype).requires_grad_(False)
    cn = ControlNetModel.from_unet(unet).to("cuda", torch.float32).train()
    open_zero(cn)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        cn.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(cn.parameters(), lr=1e-5)
    lat = torch.randn(batch, 4, 64, 64, device="cuda", dtype=dtype)
    ctx = torch.randn(batch, 77, 768, device="cuda", dtype=dtype)
    cond = torch.rand(batch, 3, 512, 512, device="cuda", dtype=dtype)

    def step() -> None:
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (batch,), device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            down, mid = cn(lat, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
            pred = unet(
                lat + noise,
                t,
                encoder_hidden_states=ctx,
                down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype),
                return_dict=False,
            )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = cuda_time(step, warmup=3, reps=10)
    return {"samples_per_s": batch / s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def largest_batch(
    measure: Callable[[int], dict[str, float]],
    capacity_gib: float,
    first: int,
    small: dict[str, float],
    *,
    multiple: int = 8,
    headroom: float = 0.95,
) -> tuple[int, dict[str, float]]:
    """The largest multiple of ``multiple`` batch that ``measure`` (one run at a batch, returning
    its ``peak_gib``; raising ``torch.cuda.OutOfMemoryError`` when it does not fit) runs within
    ``capacity_gib``, and that run's row; ``small`` is the row already measured at batch ``first``.
    Peak memory grows linearly with the batch (fixed weights and optimiser state, activations per
    sample): the runs at ``first`` and twice that give the line; the batch it predicts to fill
    ``headroom`` of the memory is tried, then smaller ones until one fits."""
    large = measure(2 * first)
    per_sample = (large["peak_gib"] - small["peak_gib"]) / first
    fixed = small["peak_gib"] - first * per_sample
    if not per_sample > 0:
        raise ValueError(
            f"peak memory did not grow with the batch ({small['peak_gib']} -> {large['peak_gib']} GiB)"
        )
    best, best_row = 2 * first, large
    batch = int((capacity_gib * headroom - fixed) / per_sample) // multiple * multiple
    too_large = None  # the smallest batch found not to fit
    while batch > best:
        try:  # (each run frees what the last one left, an out-of-memory run too)
            best, best_row = batch, measure(batch)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory", flush=True)
            too_large = batch
        if too_large is None:
            break
        batch = (best + too_large) // 2 // multiple * multiple  # between what fits and what does not
    return best, best_row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peer", action="store_true")
    p.add_argument("--compile", action="store_true", help="also measure our loop with --compile")
    p.add_argument(
        "--compile-mode", default="reduce-overhead", help="with --compile: modes to measure, comma-separated"
    )
    p.add_argument(
        "--no-eager",
        action="store_true",
        help="with --compile: only the compiled rows (each compiles for minutes)",
    )
    p.add_argument("--finetune", action="store_true", help="also measure our full-UNet fine-tuning step")
    p.add_argument("--checkpointing", action="store_true", help="also measure with gradient checkpointing")
    p.add_argument(
        "--largest-batch",
        action="store_true",
        help="also find and time the largest batch that fits on the GPU, for each row (several runs each)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: check the script, time nothing"
    )
    args = p.parse_args()
    global SMOKE
    SMOKE = args.smoke
    res: dict[str, Any] = {"env": environment(), "command": " ".join(sys.argv), "batch": args.batch}
    rows: list[dict[str, Any]] = []

    def add(name: str, batch: int = args.batch, **kw: Any) -> None:
        rows.append({"run": name, "batch": batch, **kw})
        print(rows[-1], flush=True)
        write_json(args.out, {**res, "rows": rows})  # so far: a run cut short keeps its rows

    def add_largest(name: str, measure: Callable[[int], dict[str, float]], row: dict[str, float]) -> None:
        """The row at the largest batch that fits, reusing ``row`` (the run at --batch)."""
        if args.largest_batch and not SMOKE:
            capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
            batch, at = largest_batch(measure, capacity, args.batch, row)
            add(f"{name}, largest batch", batch, **at)

    if args.no_eager and not args.compile:
        p.error("--no-eager needs --compile (there would be nothing of ours to measure)")
    compiles: list[str | None] = [
        *([] if args.no_eager else [None]),
        *(args.compile_mode.split(",") if args.compile else []),
    ]
    ckpts = [False, True] if args.checkpointing else [False]
    if args.peer:
        for ck in ckpts:
            name = "diffusers recipe" + (" + checkpointing" if ck else "")
            row = peer(args.batch, checkpointing=ck)
            add(name, **row)
            add_largest(name, lambda b, ck=ck: peer(b, checkpointing=ck), row)
    for comp in compiles:
        for ck in ckpts:
            name = f"ours controlnet{f' --compile {comp}' if comp else ''}{' + checkpointing' if ck else ''}"
            row = ours("controlnet", args.batch, args.steps, compile=comp, checkpointing=ck)
            add(name, **row)
            add_largest(
                name,
                lambda b, comp=comp, ck=ck: ours("controlnet", b, args.steps, compile=comp, checkpointing=ck),
                row,
            )
        if args.finetune:
            name = "ours full-UNet fine-tune" + (f" --compile {comp}" if comp else "")
            add(name, **ours("finetune", args.batch, args.steps, compile=comp, checkpointing=False))
    res["rows"] = rows
    write_json(args.out, res)
    print()
    print(table(rows, ["run", "batch", "samples_per_s", "peak_gib"]))


if __name__ == "__main__":
    main()
