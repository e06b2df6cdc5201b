"""Training speed and memory of a Flux.1 ControlNet: our loop against diffusers'
``examples/controlnet/train_controlnet_flux.py`` step, in one command.

Flux.1-dev shapes (19 double + 38 single blocks, random weights), the recipe's default ControlNet
(4 double + 4 single blocks), guidance input 3.5, bf16 base, float32 ControlNet under bf16
autocast, AdamW, T5 context of 512 tokens; 512x512 or 1024x1024. The peer is the recipe's step as
published: both images through the VAE every step, logit-normal timesteps, the transformer and
the ControlNet from diffusers, the NaN check of every gradient, gradient clipping at 1.0. Ours is
the real ``controlnet.training.train.train`` loop on items shaped like a latent cache's (latents,
uint8 conditions, prompt embeddings: ``controlnet data cache`` makes them once; the condition
still goes through the VAE every step, as in the recipe). One step's arithmetic (forward and
backward, torch's FLOP counter) over the bf16 matmul peak of the same run gives the floor. The
measurement (a family's :class:`Case`: ours, the recipe, the profile, the rows) is shared with
``bench_train_sd3.py``.

    python benchmarks/bench_train_flux.py --out results/train-flux.json --peer [--size 1024]
        [--batch 1] [--checkpointing] [--largest-batch] [--profile]
        [--compile default] [--compile reduce-overhead]
    python benchmarks/bench_train_flux.py --smoke     # tiny shapes on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_flux import FULL, TINY, _NoText, vae
from bench_train import CachedLike, _peak, _reset, largest_batch, logged_rates
from common import cuda_time, environment, matmul_peak_tflops, table, write_json

from controlnet.families.flux import FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.families.protocol import PromptEmbeddings
from controlnet.model.fastpath import COMPILE_MODES
from controlnet.training.batches import collate, to_device
from controlnet.training.objectives import ControlNetObjective, StepNoise
from controlnet.training.train import TrainConfig, train

SMOKE = False
GUIDANCE = 3.5  # the recipe's --guidance_scale
RECIPE = (4, 4)  # the recipe's --num_double_layers, --num_single_layers


@dataclass
class Case:
    """One family's training benchmark: the locked base, the ControlNet trained (its config), the
    cached context's length in tokens, and the recipe's step (``recipe(batch, size)``: the step to
    time, over diffusers' ControlNet; the base's blocks run as diffusers writes them)."""

    base: Any
    copied: Any
    text: int
    recipe: Callable[[int, int], Callable[[], None]]
    stock_blocks: Callable[[torch.nn.Module], Any]
    name: str = "diffusers recipe"


def _device() -> str:
    return "cpu" if SMOKE else "cuda"


def _copied() -> FluxControlNetConfig:
    """The ControlNet trained: the recipe's (one block of each kind for the smoke test's model)."""
    return FluxControlNetConfig(1, 1) if SMOKE else FluxControlNetConfig(*RECIPE)


def flux_case() -> Case:
    from controlnet.families.flux.fused import stock_blocks

    base = build()
    text = 8 if SMOKE else 512  # the recipe's T5 length
    return Case(base, _copied(), text, lambda b, size: recipe_step(base, b, size, text), stock_blocks)


def build() -> FluxBase:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(_device()):
        transformer = FluxTransformer2DModel(**(TINY if SMOKE else FULL))
    dtype = torch.float32 if SMOKE else torch.bfloat16
    return FluxBase(transformer.to(dtype), vae(SMOKE).to(_device(), dtype), _NoText(), _NoText(), None, None)


def cached_like(case: Case, n: int, size: int) -> CachedLike:
    """Items shaped like a latent cache's for a transformer base: its latents, the text context,
    the pooled text vector (Flux's and SD3's transformers name their widths alike)."""
    base, t = case.base, case.base.transformer.config
    return CachedLike(
        n,
        size,
        latent=(base.latent_channels, base.vae_scale_factor),
        context=(case.text, t.joint_attention_dim),
        added={"pooled": t.pooled_projection_dim},
    )


def _objective(case: Case) -> ControlNetObjective:
    cn = case.base.new_controlnet(case.copied).float()
    objective = ControlNetObjective(case.base, cn)
    t = case.base.transformer.config
    objective.inputs.empty = PromptEmbeddings(
        torch.zeros(1, case.text, t.joint_attention_dim), {"pooled": torch.zeros(1, t.pooled_projection_dim)}
    )
    return objective


def step_flops(case: Case, batch: int, size: int) -> float:
    """One training step's arithmetic (forward and backward) at ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode, mm_flop

    base = case.base
    objective = _objective(case)
    objective.prepare(torch.device(_device()), base.dtype)
    data = cached_like(case, batch, size)
    items = to_device(collate([data[i] for i in range(batch)]), torch.device(_device()))

    def addmm_activation(bias: Any, a: Any, b: Any, *_: Any, **__: Any) -> int:
        return mm_flop(a, b)

    mapping = {torch.ops.aten._addmm_activation: addmm_activation}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with torch.autocast(_device(), dtype=torch.bfloat16, enabled=not SMOKE):
            loss = objective(items, StepNoise(0, 0, 0, batch, slice(0, batch), _device()))
        loss.backward()
    del objective
    return float(counter.get_total_flops())


def ours(
    case: Case,
    batch: int,
    size: int,
    steps: int,
    *,
    checkpointing: bool,
    compile_mode: str | None = None,
    out: str | None = None,
) -> dict[str, float]:
    """Our ``train`` loop (per process: ``batch``; the rate is the whole run's); ``compile_mode``:
    with ``--compile`` in that mode (the networks' blocks compiled one kind at a time; the locked
    base stays compiled for later rows); ``out``: the run folder (every process of a distributed
    run must name the same one), a temporary one when None."""
    _reset()
    objective = _objective(case)
    if torch.cuda.is_available() and not SMOKE:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        out = out or tmp
        cfg = TrainConfig(
            out=out,
            cpu=SMOKE,
            steps=steps,
            batch_size=batch,
            lr=1e-5,
            mixed_precision="no" if SMOKE else "bfloat16",
            gradient_checkpointing=checkpointing,
            compile=compile_mode is not None,
            compile_mode=compile_mode or "default",
            max_grad_norm=1.0,
            log_every=max(1, steps // 3),
            save_checkpoints=False,
            num_workers=2,
            progress=False,
        )
        train(cfg, objective, cached_like(case, batch * 4, size))
        rates = logged_rates(out)
    peak = _peak()
    objective.controlnet.to("cpu")
    del objective
    return {"samples_per_s": sum(rates[1:]) / max(1, len(rates[1:])), "peak_gib": peak}


def time_recipe(
    case: Case, batch: int, size: int, *, checkpointing: bool, cudnn_attention: bool = True
) -> dict:
    """Samples/s and peak memory of the recipe's step; ``cudnn_attention=False`` keeps torch's
    SDPA off cuDNN's kernel for it (on 2026-12-06, torch 2.11 on an H100, Flux's recipe step
    stopped with an illegal memory access in its backward pass)."""
    _reset()
    transformer = case.base.transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    step = case.recipe(batch, size)
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention and cudnn)
    try:
        with case.stock_blocks(transformer):  # diffusers' own blocks
            seconds = cuda_time(step, warmup=2, reps=5) if not SMOKE else _cpu_time(step)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        if checkpointing:
            transformer.disable_gradient_checkpointing()
    return {"samples_per_s": batch / seconds, "peak_gib": _peak()}


def recipe_controlnet(cls: type, base: Any, copied: Any, **fields: Any) -> Any:
    """diffusers' ControlNet ``cls`` for the recipe: the base transformer's configuration with
    ``fields`` over it, in float32 for training, holding the same starting copy as ours
    (``base.new_controlnet(copied)``), checkpointed when the base is."""
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in dict(base.transformer.config).items() if k in accepted}
    with torch.device(_device()):
        cn = cls(**{**config, **fields}).float().train()
    cn.load_state_dict(base.new_controlnet(copied).state_dict())
    if base.transformer.is_gradient_checkpointing:
        cn.enable_gradient_checkpointing()
    return cn


def recipe_step(base: FluxBase, batch: int, size: int, text: int) -> Callable[[], None]:
    """The Flux recipe's training step, as published, over diffusers' FluxControlNetModel (the same
    starting copy as ours) and the same locked transformer and VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    device, dtype = _device(), torch.float32 if SMOKE else torch.bfloat16
    t = dict(base.transformer.config)
    copied = _copied()
    cn = recipe_controlnet(
        FluxControlNetModel,
        base,
        copied,
        num_layers=copied.num_layers,
        num_single_layers=copied.num_single_layers,
    )
    opt = torch.optim.AdamW(cn.parameters(), lr=1e-5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # the copy the recipe draws timesteps from
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    control = torch.rand(batch, 3, size, size, generator=g).to(device, dtype)
    context = torch.randn(batch, text, t["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(batch, t["pooled_projection_dim"], generator=g).to(device, dtype)
    txt_ids = torch.zeros(text, 3, device=device, dtype=dtype)
    vae_ = base.vae
    shift, scale = vae_.config.shift_factor, vae_.config.scaling_factor

    def latents(images: torch.Tensor) -> torch.Tensor:
        z = (vae_.encode(images).latent_dist.sample() - shift) * scale
        return FluxControlNetPipeline._pack_latents(z, *z.shape)

    def step() -> None:
        x = latents(pixels)
        hint = latents(control)
        h, w = size // base.vae_scale_factor, size // base.vae_scale_factor
        ids = FluxControlNetPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, device, dtype)
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0)
        timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()].to(device)
        sigmas = (timesteps / 1000).view(-1, 1, 1).to(dtype)
        noisy = (1.0 - sigmas) * x + sigmas * noise
        guidance = torch.full((batch,), GUIDANCE, device=device, dtype=dtype)
        kw = dict(
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=txt_ids,
            img_ids=ids,
            return_dict=False,
        )
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not SMOKE):
            double, single = cn(hidden_states=noisy, controlnet_cond=hint, **kw)
        pred = base.transformer(
            hidden_states=noisy,
            controlnet_block_samples=[s.to(dtype) for s in double],
            controlnet_single_block_samples=[s.to(dtype) for s in single],
            **kw,
        )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x).float())
        loss.backward()
        for p in cn.parameters():  # the recipe checks every gradient for NaN
            if p.grad is not None and torch.isnan(p.grad).any():
                raise FloatingPointError("NaN gradient")
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile(case: Case, batch: int, size: int, out: Path) -> dict[str, float]:
    """Where one of our training steps' time goes: the step as ``train`` runs it (the objective
    under bf16 autocast, backward, clipping at 1.0, fused AdamW) in a bare loop; GPU milliseconds
    by kind of kernel (the 40 longest kernels written to ``out``) and the step's wall time, whose
    excess over the GPU's busy time is time the GPU waited for Python."""
    from profile_kernels import kernel_profile

    _reset()
    objective = _objective(case)
    device = torch.device(_device())
    objective.prepare(device, case.base.dtype)
    params = [p for m in objective.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    data = cached_like(case, batch, size)
    items = to_device(collate([data[i] for i in range(batch)]), device)
    counter = iter(range(10**9))

    def step() -> None:
        noise = StepNoise(0, next(counter), 0, batch, slice(0, batch), _device())
        with torch.autocast(_device(), dtype=torch.bfloat16, enabled=not SMOKE):
            loss = objective(items, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    wall = (cuda_time(step, warmup=2, reps=4) if not SMOKE else _cpu_time(step)) * 1e3
    kinds = kernel_profile(step, out)
    objective.controlnet.to("cpu")
    return {"wall ms": wall, **{k: round(v, 2) for k, v in kinds.items()}}


def _cpu_time(fn: Any) -> float:
    import time

    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(make_case: Callable[[], Case] = flux_case, default_json: str = "train-flux.json") -> None:
    """The command line of a family's training benchmark (``make_case`` builds its case)."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--peer", action="store_true")
    p.add_argument(
        "--peer-no-cudnn-attention",
        action="store_true",
        help="the recipe's step with torch's SDPA kept off cuDNN's attention kernel (see peer())",
    )
    p.add_argument("--peer-only", action="store_true", help="time the recipe's step alone (not ours)")
    p.add_argument("--checkpointing", action="store_true", help="also with gradient checkpointing")
    p.add_argument("--largest-batch", action="store_true", help="also the largest batch that fits, per row")
    p.add_argument(
        "--compile",
        action="append",
        default=[],
        choices=COMPILE_MODES,
        help="also ours with --compile in this mode (last: it stays compiled)",
    )
    p.add_argument(
        "--profile", action="store_true", help="where our step's GPU time goes (kernel list beside --out)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script")
    args = p.parse_args()
    global SMOKE
    SMOKE = args.smoke
    size = 32 if SMOKE else args.size
    case = make_case()
    res: dict[str, Any] = {"env": environment(), "command": " ".join(sys.argv), "size": size}
    flops = step_flops(case, args.batch, size) / args.batch  # per sample
    peak = float("nan") if SMOKE else matmul_peak_tflops()
    res.update(tflop_per_sample=flops / 1e12, matmul_peak_tflops=peak)
    rows: list[dict[str, Any]] = []

    def add(name: str, batch: int, row: dict[str, float]) -> None:
        floor = peak * 1e12 / flops  # samples/s at the peak
        rows.append({"run": name, "batch": batch, **row, "of floor": round(row["samples_per_s"] / floor, 3)})
        print(rows[-1], flush=True)
        write_json(args.out, {**res, "rows": rows})

    if args.profile:
        kernels = Path(args.out or default_json).with_suffix(".kernels.txt")
        kernels.parent.mkdir(parents=True, exist_ok=True)
        res["profile, ours, ms per step"] = profile(case, args.batch, size, kernels)
        print(res["profile, ours, ms per step"], flush=True)
        write_json(args.out, res)
    cudnn = not args.peer_no_cudnn_attention
    recipe = case.name + ("" if cudnn else " (no cuDNN attention)")
    for ck in [False, True] if args.checkpointing else [False]:
        suffix = " + checkpointing" if ck else ""
        runs = []
        if args.peer or args.peer_only:
            runs.append(
                (
                    recipe,
                    lambda b, ck=ck: time_recipe(case, b, size, checkpointing=ck, cudnn_attention=cudnn),
                )
            )
        if not args.peer_only:
            runs.append(("ours", lambda b, ck=ck: ours(case, b, size, args.steps, checkpointing=ck)))
            for mode in args.compile:
                runs.append(
                    (
                        f"ours --compile ({mode})",
                        lambda b, ck=ck, mode=mode: ours(
                            case, b, size, args.steps, checkpointing=ck, compile_mode=mode
                        ),
                    )
                )
        for name, measure in runs:
            row = measure(args.batch)
            add(name + suffix, args.batch, row)
            if args.largest_batch and not SMOKE:
                capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
                batch, at = largest_batch(measure, capacity, args.batch, row, multiple=1)
                add(f"{name}{suffix}, largest batch", batch, at)
    print(table(rows, ["run", "batch", "samples_per_s", "peak_gib", "of floor"]))
    print(f"per sample: {flops / 1e12:.2f} TFLOP; bf16 matmul peak {peak:.0f} TFLOP/s", end="")
    print("" if math.isnan(peak) else f"; floor {peak * 1e12 / flops:.2f} samples/s")


if __name__ == "__main__":
    main()
