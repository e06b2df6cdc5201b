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

import inspect
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compare_generation, flow_denoise, transformer_bench_args

from controlnet.families.flux import FluxControlNet, FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.families.flux.fused import stock_blocks
from controlnet.families.flux.patches import pack, unpack
from controlnet.families.flux.schedule import FLUX_SCHEDULE
from controlnet.families.protocol import PromptEmbeddings
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import initial_noise
from controlnet.model.fastpath import release_graphs

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


def ours(
    base: FluxBase,
    cn: FluxControlNet,
    x: dict[str, Any],
    steps: int,
    guidance: float,
    *,
    cuda_graphs: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    cond = PromptEmbeddings(
        x["context"],
        {"pooled": x["pooled"], "guidance": torch.full((1,), guidance, device=x["pooled"].device)},
    )
    unit = ControlUnit(cn, x["condition"], 1.0, control_type=2)
    return flow_denoise(
        base, cond, None, [unit], x["latent_size"], steps, guidance, cuda_graphs=cuda_graphs, compile=compile
    )


def peer(base: FluxBase, cn: FluxControlNet, x: dict[str, Any], steps: int, guidance: float) -> Any:
    """diffusers' pipeline over the same weights, built once; returns the call to time and the
    networks it runs every step."""
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
        with torch.no_grad(), stock_blocks(pipe.transformer):  # diffusers' own blocks
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

    return run, [pipe.transformer, pipe.controlnet]


def main() -> None:
    args = transformer_bench_args(__doc__)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 64 if args.tiny else args.size
    base, cn = build(args.tiny, device, dtype)
    x = inputs(base, size, args.tiny, device, dtype)
    compare_generation(
        args,
        device,
        dtype,
        size,
        lambda steps, **kw: ours(base, cn, x, steps, 3.5, **kw),
        (lambda: peer(base, cn, x, args.steps, 3.5)) if args.peer else None,
        blocks=FluxBase.blocks,
        release=lambda: release_graphs(base.transformer),
        fp8=lambda: base.use_fp8([cn]),
    )


if __name__ == "__main__":
    main()
