"""Flux.1 generation speed with a Union ControlNet: ours against diffusers' FluxControlNetPipeline.

Flux.1-dev shapes (19 double + 38 single blocks, 3072 wide) with random weights, a Union
ControlNet of 5 double + 10 single blocks, 1024x1024, 28 steps, guidance 3.5 read by the network,
bf16, batch 1. Both are timed from prompt embeddings and the condition's latents to the final
latents (the text encoders and the VAE are the same work on both sides and are left out); the
arithmetic per step is counted (torch's FLOP counter) and set against the bf16 matmul peak
measured in the same run, which gives the floor.

    python benchmarks/bench_flux.py --out results/flux.json [--peer] [--tiny]

``--tiny``: a few-channel model on the CPU, to check the script itself (CI runs it). Prints a
markdown table; checks that our latents equal diffusers' (same weights, same noise) within bf16
tolerance.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_time, environment, matmul_peak_tflops, table, write_json

from controlnet.families.flux import FluxControlNet, FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.families.flux.patches import pack, unpack
from controlnet.families.flux.schedule import FLUX_SCHEDULE
from controlnet.families.protocol import PromptEmbeddings
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import denoise, initial_noise

FULL = {"guidance_embeds": True}  # diffusers' defaults are Flux.1's sizes
TINY = {
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 10,
    "guidance_embeds": True,
    "axes_dims_rope": [2, 2, 4],
}


class _NoText(torch.nn.Module):
    """Text encoders are not timed: embeddings are given. A stand-in that says so if called."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the benchmark gives prompt embeddings; no text encoder runs")


def vae(tiny: bool, scale: float = 0.3611, shift: float = 0.1159):
    """The 16-channel VAE of Flux.1 and SD3 (tiny: a few channels; ``scale``/``shift``: the
    family's, Flux.1's by default), random weights, its posterior made narrow so that diffusers'
    sample of the condition's latents is their mean, which we take."""
    from diffusers import AutoencoderKL

    widths = (8, 16) if tiny else (128, 256, 512, 512)
    model = AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=4 if tiny else 16,
        layers_per_block=1 if tiny else 2,
        norm_num_groups=4 if tiny else 32,
        scaling_factor=scale,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    c = model.config.latent_channels
    with torch.no_grad():
        model.encoder.conv_out.weight[c:].zero_()
        model.encoder.conv_out.bias[c:].fill_(-1000.0)
    return model


def build(tiny: bool, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**(TINY if tiny else FULL)).to(dtype).eval()
    base = FluxBase(transformer, vae(tiny).to(device, dtype), _NoText(), _NoText(), None, None)
    config = FluxControlNetConfig(1, 1, num_mode=3) if tiny else FluxControlNetConfig(5, 10, num_mode=10)
    cn = FluxControlNet.from_transformer(transformer, config, seed=1).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return base, cn


def inputs(base: FluxBase, size: int, tiny: bool, device: str, dtype: torch.dtype) -> dict[str, Any]:
    t = base.transformer.config
    g = torch.Generator().manual_seed(3)
    text = 8 if tiny else 512
    return {
        "context": torch.randn(1, text, t.joint_attention_dim, generator=g).to(device, dtype),
        "pooled": torch.randn(1, t.pooled_projection_dim, generator=g).to(device, dtype),
        "condition": torch.rand(1, 3, size, size, generator=g).to(device, dtype),  # an image in [0, 1]
        "latent_size": base.latent_size((size, size)),
    }


def ours(base: FluxBase, cn: FluxControlNet, x: dict[str, Any], steps: int, guidance: float) -> torch.Tensor:
    cond = PromptEmbeddings(
        x["context"],
        {"pooled": x["pooled"], "guidance": torch.full((1,), guidance, device=x["pooled"].device)},
    )
    unit = ControlUnit(cn, x["condition"], 1.0, control_type=2)
    return denoise(
        base,
        cond,
        None,
        [unit],
        sampler="euler",
        timestep_spacing="default",
        steps=steps,
        guidance=guidance,
        eta=0.0,
        seeds=[0],
        latent_size=x["latent_size"],
        progress=False,
        cuda_graphs=False,
    ).latents


def peer(base: FluxBase, cn: FluxControlNet, x: dict[str, Any], steps: int, guidance: float) -> Any:
    """diffusers' pipeline over the same weights, built once; returns the call to time."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline

    t = dict(base.transformer.config)
    accepted = inspect.signature(FluxControlNetModel.__init__).parameters
    fields = {k: v for k, v in t.items() if k in accepted}
    fields.update(
        num_layers=cn.config.num_layers,
        num_single_layers=cn.config.num_single_layers,
        num_mode=cn.config.num_mode,
    )
    with torch.device(x["pooled"].device):
        model = FluxControlNetModel(**fields).to(x["pooled"].dtype).eval()
    model.load_state_dict(cn.state_dict())
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=base.transformer,
        controlnet=model,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = x["latent_size"]
    noise = pack(initial_noise((1, t["in_channels"] // 4, h, w), [0], x["pooled"].device, torch.float32))

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = pipe(
                prompt_embeds=x["context"],
                pooled_prompt_embeds=x["pooled"],
                control_image=x["condition"] * 2 - 1,  # a tensor reaches its VAE as it is
                control_mode=2,
                height=h * base.vae_scale_factor,
                width=w * base.vae_scale_factor,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=noise.to(x["pooled"].dtype),
                output_type="latent",
            ).images
        return unpack(out, h, w)

    return run


def step_flops(base: FluxBase, cn: FluxControlNet, x: dict[str, Any]) -> float:
    """The arithmetic of one step (the ControlNet and the transformer), counted by torch: a
    two-step run less a one-step run, so the condition's one VAE pass is not counted."""
    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ours(base, cn, x, steps=steps, guidance=3.5)
        counts.append(float(counter.get_total_flops()))
    return counts[1] - counts[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--peer", action="store_true", help="time diffusers' pipeline in the same run")
    p.add_argument("--tiny", action="store_true", help="a few-channel model on the CPU (checks the script)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 64 if args.tiny else args.size
    base, cn = build(args.tiny, device, dtype)
    x = inputs(base, size, args.tiny, device, dtype)
    rows: list[dict[str, Any]] = []
    flops = step_flops(base, cn, x)
    peak = matmul_peak_tflops()
    record: dict[str, Any] = {
        "environment": environment(),
        "steps": args.steps,
        "size": size,
        "dtype": str(dtype),
    }

    def timed(name: str, fn: Any) -> torch.Tensor:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = {}
        seconds = cuda_time(lambda: result.update(out=fn()), warmup=1, reps=args.reps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append(
            {
                "path": name,
                "s/image": round(seconds, 3),
                "ms/step": round(1000 * seconds / args.steps, 1),
                "TFLOP/s": round(flops * args.steps / seconds / 1e12, 1),
                "peak GiB": round(mem, 1),
            }
        )
        gc.collect()
        return result["out"]

    got = timed("ours (default)", lambda: ours(base, cn, x, args.steps, 3.5))
    if args.peer:
        run_peer = peer(base, cn, x, args.steps, 3.5)
        want = timed("diffusers eager", run_peer)
        record["max_abs_diff"] = float((got.float() - want.float()).abs().max())
    record.update(rows=rows, step_tflop=flops / 1e12, matmul_peak_tflops=peak)
    record["floor_s"] = flops * args.steps / (peak * 1e12) if peak == peak else None
    print(table(rows, ["path", "s/image", "ms/step", "TFLOP/s", "peak GiB"]))
    print(f"per step: {flops / 1e12:.2f} TFLOP; bf16 matmul peak {peak:.0f} TFLOP/s")
    if "max_abs_diff" in record:
        print(f"ours vs diffusers: max |difference| of the final latents {record['max_abs_diff']:.3g}")
    write_json(args.out, record)


if __name__ == "__main__":
    main()
