"""End-to-end generation speed: ours against diffusers' StableDiffusionControlNetPipeline.

SD1.5 architecture, random weights (the ControlNet weights are loaded into diffusers'
ControlNetModel too: our state-dict keys are diffusers'), 512x512, 20 DDIM steps, guidance 9.
Timed from prompt embeddings and a condition image to decoded uint8 images on the host, for both.

    python benchmarks/bench_generate.py --out results/generate.json [--peer] [--peer-compile] [--fast]

Prints a markdown table; checks that our images equal diffusers' (same weights, same initial
noise) and that the fast path's equal the default path's, within bf16 tolerance.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_time, diffusers_controlnet, environment, matmul_peak_tflops, sd15, table, write_json

from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.sd.forward import controlled_unet_forward
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import denoise, initial_noise
from controlnet.model.control import Control, control_scales
from controlnet.model.fastpath import compile_modules, release_graphs

STEPS, GUIDANCE, SIZE = 20, 9.0, 512


def ours(
    base,
    cns,
    emb,
    neg,
    cond,
    batch: int,
    *,
    graphs: bool,
    compile: bool,
    concurrent: bool = True,
    keep_graphs: bool = True,
) -> torch.Tensor:
    """Our generation path (what ``controlnet generate`` runs after loading): hint once, the step
    loop, VAE decode, images to the host. ``keep_graphs=False`` drops the step graphs first, so
    that the call captures its own (as every call did before they were kept)."""
    if not keep_graphs:
        release_graphs(base.unet)
    units = [ControlUnit(cn, cond) for cn in cns]
    out = denoise(
        base,
        emb.repeat(batch),
        neg.repeat(batch),
        units,
        steps=STEPS,
        guidance=GUIDANCE,
        seeds=list(range(batch)),
        latent_size=(SIZE // 8, SIZE // 8),
        progress=False,
        cuda_graphs=graphs,
        compile=compile,
        concurrent_controls=concurrent,
    )
    if compile:
        compile_modules([base.vae.decoder])
    images = base.decode_latents(out.latents)
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def peer_pipeline(base, cns):
    from diffusers import (
        DDIMScheduler,
        MultiControlNetModel,
        StableDiffusionControlNetPipeline,
    )

    dcns = [diffusers_controlnet(base.unet, cn) for cn in cns]
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        unet=base.unet,
        controlnet=dcns[0] if len(dcns) == 1 else MultiControlNetModel(dcns),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peer(pipe, emb, neg, cond, batch: int, n_cn: int, latents=None):
    image = cond.expand(batch, -1, -1, -1)
    out = pipe(
        prompt_embeds=emb.context.expand(batch, -1, -1),
        negative_prompt_embeds=neg.context.expand(batch, -1, -1),
        image=image if n_cn == 1 else [image] * n_cn,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        output_type="pt",
        latents=latents,
    ).images
    return (out * 255).round().to(torch.uint8).cpu()


def step_flops(base, cns, emb, neg, cond) -> float:
    """FLOPs of one CFG step (batch 2) of UNet + ControlNets."""
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, device=base.device, dtype=base.dtype)
    ctx = torch.cat([neg.context, emb.context])
    controls = [Control(cn, cn.encode_hint(cond), control_scales(cn.num_residuals)) for cn in cns]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        controlled_unet_forward(base.unet, x, torch.tensor(500, device=base.device), ctx, controls)
    return fc.get_total_flops()


def ablations(record, base, cns, emb, neg, cond, *, compile: bool, label: str) -> None:
    """Batch 1, one ControlNet, with one optimisation taken away: the step graphs kept across
    calls; the UNet's encoder running beside the ControlNet."""
    record(
        f"{label}, graph captured every call",
        lambda: ours(base, cns[:1], emb, neg, cond, 1, graphs=True, compile=compile, keep_graphs=False),
        1,
        1,
    )
    record(
        f"{label}, UNet encoder before the ControlNet",
        lambda: ours(base, cns[:1], emb, neg, cond, 1, graphs=True, compile=compile, concurrent=False),
        1,
        1,
    )


def decode_ms(base) -> float:
    """Milliseconds of the VAE decode of one 512x512 image (as the last call left the decoder)."""
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, device=base.device, dtype=base.dtype)
    return 1e3 * cuda_time(lambda: base.decode_latents(latents), warmup=2, reps=10)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--peer", action="store_true", help="also time diffusers' pipeline (eager)")
    p.add_argument("--peer-compile", action="store_true", help="also time diffusers with torch.compile")
    p.add_argument("--fast", action="store_true", help="also time our --fast path (torch.compile)")
    p.add_argument("--fast-batch8", action="store_true", help="with --fast: also batch 8 (compiles again)")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also time batch 1 with one optimisation taken away at a time, and the decode alone",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: check the script, time nothing"
    )
    args = p.parse_args()
    global SIZE
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        SIZE = 64
    dtype = getattr(torch, args.dtype)
    res: dict[str, Any] = {"env": environment(), "dtype": args.dtype, "command": " ".join(sys.argv)}
    res["matmul_peak_tflops"] = matmul_peak_tflops(dtype=dtype)
    rows: list[dict[str, Any]] = []

    base, cns = sd15(dev, torch.float32 if args.smoke else dtype, n_controlnets=2, smoke=args.smoke)
    dtype = base.dtype
    g = torch.Generator().manual_seed(0)
    emb = PromptEmbeddings(torch.randn(1, 77, 768, generator=g).to(dev, dtype))
    neg = PromptEmbeddings(torch.randn(1, 77, 768, generator=g).to(dev, dtype))
    cond = torch.rand(1, 3, SIZE, SIZE, generator=g).to(dev, dtype)
    flops = {n: step_flops(base, cns[:n], emb, neg, cond) for n in (1, 2)}
    res["step_tflop"] = {str(n): f / 1e12 for n, f in flops.items()}

    def record(name: str, fn, batch: int, n_cn: int, reps: int = args.reps) -> float:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        s = cuda_time(fn, warmup=1, reps=reps)
        achieved = STEPS * flops[n_cn] * batch / s / 1e12  # UNet + ControlNet work only
        rows.append(
            {
                "path": name,
                "controlnets": n_cn,
                "batch": batch,
                "s_per_image": s / batch,
                "images_per_s": batch / s,
                "ms_per_step": s / STEPS * 1e3,
                "first_call_s": first,
                "tflops": achieved,
                "pct_peak": 100 * achieved / res["matmul_peak_tflops"],
            }
        )
        print(rows[-1], flush=True)
        write_json(args.out, {**res, "rows": rows})  # so far: a run cut short keeps its rows
        return s

    # ours: eager (no graphs), default (CUDA graphs), batch 1 and 8, one and two ControlNets
    if args.smoke:
        args.reps = 1
    record("ours eager", lambda: ours(base, cns[:1], emb, neg, cond, 1, graphs=False, compile=False), 1, 1)
    for n_cn in (1, 2):
        record(
            "ours default",
            lambda n=n_cn: ours(base, cns[:n], emb, neg, cond, 1, graphs=True, compile=False),
            1,
            n_cn,
        )
    record(
        "ours default, ControlNets one after the other",
        lambda: ours(base, cns, emb, neg, cond, 1, graphs=True, compile=False, concurrent=False),
        1,
        2,
    )
    two = ours(base, cns, emb, neg, cond, 1, graphs=True, compile=False)
    two_seq = ours(base, cns, emb, neg, cond, 1, graphs=True, compile=False, concurrent=False)
    res["concurrent_vs_sequential_max_abs_diff"] = (two.float() - two_seq.float()).abs().max().item()
    record(
        "ours default",
        lambda: ours(base, cns[:1], emb, neg, cond, 8, graphs=True, compile=False),
        8,
        1,
        reps=3,
    )
    if args.ablations:
        ablations(record, base, cns, emb, neg, cond, compile=False, label="ours default")
        res["decode_ms_eager"] = decode_ms(base)
    default_img = ours(base, cns[:1], emb, neg, cond, 1, graphs=True, compile=False)
    eager_img = ours(base, cns[:1], emb, neg, cond, 1, graphs=False, compile=False)
    res["default_vs_eager_max_abs_diff"] = (default_img.float() - eager_img.float()).abs().max().item()

    if args.peer or args.peer_compile:
        pipe = peer_pipeline(base, cns[:1])
        latents = initial_noise((1, 4, SIZE // 8, SIZE // 8), [0], base.device, dtype)
        peer_img = peer(pipe, emb, neg, cond, 1, 1, latents=latents)
        res["ours_vs_diffusers_mean_abs_diff"] = (peer_img.float() - default_img.float()).abs().mean().item()
        res["ours_vs_diffusers_max_abs_diff"] = (peer_img.float() - default_img.float()).abs().max().item()
        if args.peer:
            record("diffusers eager", lambda: peer(pipe, emb, neg, cond, 1, 1), 1, 1)
            record("diffusers eager", lambda: peer(pipe, emb, neg, cond, 8, 1), 8, 1, reps=3)
            pipe2 = peer_pipeline(base, cns[:2])
            record("diffusers eager", lambda: peer(pipe2, emb, neg, cond, 1, 2), 1, 2)
            del pipe2
        if args.peer_compile:
            pipe.unet = torch.compile(pipe.unet.to(memory_format=torch.channels_last))
            pipe.controlnet = torch.compile(pipe.controlnet.to(memory_format=torch.channels_last))
            record("diffusers compile", lambda: peer(pipe, emb, neg, cond, 1, 1), 1, 1)
            # back to plain modules for our runs
            pipe.unet, pipe.controlnet = pipe.unet._orig_mod, pipe.controlnet._orig_mod
            base.unet.to(memory_format=torch.contiguous_format)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()

    if args.fast:
        for n_cn in (1, 2):
            record(
                "ours --fast",
                lambda n=n_cn: ours(base, cns[:n], emb, neg, cond, 1, graphs=True, compile=True),
                1,
                n_cn,
            )
        record(
            "ours --fast, ControlNets one after the other",
            lambda: ours(base, cns, emb, neg, cond, 1, graphs=True, compile=True, concurrent=False),
            1,
            2,
        )
        if args.fast_batch8:  # a new shape: compiles again
            record(
                "ours --fast",
                lambda: ours(base, cns[:1], emb, neg, cond, 8, graphs=True, compile=True),
                8,
                1,
                reps=3,
            )
        if args.ablations:
            ablations(record, base, cns, emb, neg, cond, compile=True, label="ours --fast")
            res["decode_ms_compiled"] = decode_ms(base)
        fast_img = ours(base, cns[:1], emb, neg, cond, 1, graphs=True, compile=True)
        diff = (fast_img.float() - default_img.float()).abs()
        res["fast_vs_default_mean_abs_diff"] = diff.mean().item()
        res["fast_vs_default_max_abs_diff"] = diff.max().item()

    res["rows"] = rows
    write_json(args.out, res)
    print()
    print(
        table(
            rows,
            [
                "path",
                "controlnets",
                "batch",
                "s_per_image",
                "images_per_s",
                "ms_per_step",
                "first_call_s",
                "tflops",
                "pct_peak",
            ],
        )
    )
    for k in (
        "default_vs_eager_max_abs_diff",
        "concurrent_vs_sequential_max_abs_diff",
        "ours_vs_diffusers_mean_abs_diff",
        "ours_vs_diffusers_max_abs_diff",
        "fast_vs_default_mean_abs_diff",
        "fast_vs_default_max_abs_diff",
        "decode_ms_eager",
        "decode_ms_compiled",
    ):
        if k in res:
            print(f"{k}: {res[k]:.4g}")
    print(f"matmul peak {res['matmul_peak_tflops']:.0f} TFLOP/s; step TFLOP {res['step_tflop']}")


if __name__ == "__main__":
    main()
