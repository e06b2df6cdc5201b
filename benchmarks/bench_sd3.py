"""SD3.5-medium generation speed with a ControlNet: ours against diffusers'
StableDiffusion3ControlNetPipeline.

SD3.5-medium shapes (24 joint blocks, 1536 wide, q/k norms, dual attention in the first 13) with
random weights, a 12-block ControlNet, 1024x1024, 28 steps, classifier-free guidance 4.5, bf16,
batch 1. Both are timed from prompt embeddings and the condition image to the final latents (the
text encoders are left out; the condition's one VAE pass is in both); the arithmetic per step is
counted and set against the bf16 matmul peak measured in the same run.

    python benchmarks/bench_sd3.py --out results/sd3.json [--peer] [--tiny]

``--tiny``: a few-channel model on the CPU, to check the script itself (CI runs it).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_flux import _NoText, vae
from common import compare_generation, flow_denoise, transformer_bench_args

from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.sd3 import SD3ControlNet, SD3ControlNetConfig
from controlnet.families.sd3.base import SD3_SCHEDULE, SD3Base
from controlnet.families.sd3.fused import stock_blocks
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import initial_noise
from controlnet.model.fastpath import release_graphs

GUIDANCE = 4.5
FULL = {  # SD3.5-medium's transformer config
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
TINY = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 10,
    "out_channels": 4,
    "pos_embed_max_size": 32,
    "qk_norm": "rms_norm",
    "dual_attention_layers": [0],
}


def build_base(tiny: bool, device: str, dtype: torch.dtype) -> SD3Base:
    """SD3.5-medium's transformer (a tiny one: ``tiny``) and a VAE of SD3's latent scale and shift,
    random weights, no text encoders (the benchmarks start from prompt embeddings)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**(TINY if tiny else FULL)).to(dtype).eval()
    return SD3Base(
        transformer,
        vae(tiny, scale=1.5305, shift=0.0609).to(device, dtype),  # SD3's latent scale and shift
        _NoText(),
        _NoText(),
        None,
        None,
        None,
        max_sequence_length=8,
    )


def build(tiny: bool, device: str, dtype: torch.dtype) -> tuple[SD3Base, SD3ControlNet]:
    base = build_base(tiny, device, dtype)
    config = SD3ControlNetConfig(num_layers=2 if tiny else 12)
    cn = SD3ControlNet.from_transformer(base.transformer, config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return base, cn


def inputs(base: SD3Base, size: int, tiny: bool, device: str, dtype: torch.dtype) -> dict[str, Any]:
    t = base.transformer.config
    g = torch.Generator().manual_seed(3)
    text = 16 if tiny else 77 + 256

    def embeds() -> PromptEmbeddings:
        context = torch.randn(1, text, t.joint_attention_dim, generator=g).to(device, dtype)
        return PromptEmbeddings(
            context, {"pooled": torch.randn(1, t.pooled_projection_dim, generator=g).to(device, dtype)}
        )

    return {
        "cond": embeds(),
        "uncond": embeds(),
        "condition": torch.rand(1, 3, size, size, generator=g).to(device, dtype),
        "latent_size": base.latent_size((size, size)),
    }


def ours(
    base: SD3Base,
    cn: SD3ControlNet,
    x: dict[str, Any],
    steps: int,
    *,
    cuda_graphs: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    return flow_denoise(
        base,
        x["cond"],
        x["uncond"],
        [ControlUnit(cn, x["condition"], 1.0)],
        x["latent_size"],
        steps,
        GUIDANCE,
        cuda_graphs=cuda_graphs,
        compile=compile,
    )


def peer(base: SD3Base, cn: SD3ControlNet, x: dict[str, Any], steps: int) -> Any:
    """diffusers' pipeline over the same weights, built once; returns the call to time and the
    networks it runs every step."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3ControlNetModel,
        StableDiffusion3ControlNetPipeline,
    )

    accepted = inspect.signature(SD3ControlNetModel.__init__).parameters
    fields = {k: v for k, v in dict(base.transformer.config).items() if k in accepted}
    fields.update(num_layers=cn.config.num_layers, force_zeros_for_pooled_projection=cn.config.zero_pooled)
    dtype = x["cond"].context.dtype
    with torch.device(x["cond"].context.device):
        model = SD3ControlNetModel(**fields).to(dtype).eval()
    model.load_state_dict(cn.state_dict())
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=base.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        controlnet=model,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = x["latent_size"]
    noise = initial_noise((1, base.latent_channels, h, w), [0], x["cond"].context.device, torch.float32)

    def run() -> torch.Tensor:
        with torch.no_grad(), stock_blocks(pipe.transformer):  # diffusers' own blocks
            return pipe(
                prompt_embeds=x["cond"].context,
                negative_prompt_embeds=x["uncond"].context,
                pooled_prompt_embeds=x["cond"].added["pooled"],
                negative_pooled_prompt_embeds=x["uncond"].added["pooled"],
                control_image=x["condition"] * 2 - 1,  # a tensor reaches its VAE as it is
                height=h * base.vae_scale_factor,
                width=w * base.vae_scale_factor,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                latents=noise.to(dtype),
                output_type="latent",
            ).images

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
        lambda steps, **kw: ours(base, cn, x, steps, **kw),
        (lambda: peer(base, cn, x, args.steps)) if args.peer else None,
        blocks=SD3Base.blocks,
        release=lambda: release_graphs(base.transformer),
        fp8=lambda: base.use_fp8([cn]),
    )


if __name__ == "__main__":
    main()
