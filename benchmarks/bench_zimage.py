"""Z-Image generation speed with a ControlNet: ours against diffusers' ZImageControlNetPipeline.

Z-Image's transformer at its released shape (30 layers, 3840 wide: 6.15 billion parameters) with
random weights, a ControlNet of Union 2.1's shape (15 control blocks, every 2nd layer, control
blocks refining the condition, 33 condition channels), 1024x1024, bf16, batch 1, as
Z-Image-Turbo (which the published ControlNets are made for) runs: 9 steps, no guidance
(``--guidance 6`` for the base model's classifier-free guidance, on our scale). Both are timed
from prompt embeddings (a 96-token caption; with guidance a 12-token negative) and the condition
image to the final latents (the Qwen3 text encoder is left out; the condition's one VAE pass is in
both). The arithmetic per step is counted and set against the bf16 matmul peak of the same run.

    python benchmarks/bench_zimage.py --peer --out results/zimage.json   # a few minutes, H100
    python benchmarks/bench_zimage.py --tiny --peer                       # CPU: the script itself
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_flux import _NoText, vae
from common import built_in, compare_generation, flow_denoise, transformer_bench_args

from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.zimage import ZImageControlNet, ZImageControlNetConfig
from controlnet.families.zimage.base import ZIMAGE_SCHEDULE, ZImageBase
from controlnet.families.zimage.fused import stock_blocks
from controlnet.formats.dit_controlnet import diffusers_config
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import initial_noise
from controlnet.model.fastpath import release_graphs

PROMPT_TOKENS, NEGATIVE_TOKENS = 96, 12
TINY = {
    "in_channels": 4,
    "dim": 32,
    "n_layers": 4,
    "n_refiner_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 12,
    "axes_dims": [4, 6, 6],
    "axes_lens": [512, 64, 64],
}
UNION_21 = ZImageControlNetConfig(tuple(range(0, 30, 2)), (0, 1), 33, "control_noise_refiner")
TINY_CN = ZImageControlNetConfig((0, 2), (0, 1), 6, "control_noise_refiner")


def build(tiny: bool, device: str, dtype: torch.dtype) -> tuple[ZImageBase, ZImageControlNet]:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    with built_in(dtype, device):
        transformer = ZImageTransformer2DModel(**(TINY if tiny else {})).eval()
    base = ZImageBase(transformer, vae(tiny).to(device, dtype), _NoText(), None)
    cn = base.new_controlnet(TINY_CN if tiny else UNION_21).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "_proj" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return base, cn


def inputs(base: ZImageBase, size: int, tiny: bool, device: str, dtype: torch.dtype) -> dict[str, Any]:
    width = base.transformer.config.cap_feat_dim
    g = torch.Generator().manual_seed(3)
    n, m = (8, 3) if tiny else (PROMPT_TOKENS, NEGATIVE_TOKENS)
    return {
        "prompt": torch.randn(n, width, generator=g).to(device, dtype),
        "negative": torch.randn(m, width, generator=g).to(device, dtype),
        "condition": torch.rand(1, 3, size, size, generator=g).to(device, dtype),
        "latent_size": base.latent_size((size, size)),
    }


def ours(
    base: ZImageBase,
    cn: ZImageControlNet,
    x: dict[str, Any],
    steps: int,
    guidance: float,
    *,
    cuda_graphs: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """As generate encodes them: the prompts padded to one width, each with its own length."""
    prompt, negative = x["prompt"], x["negative"]
    n, m = len(prompt), len(negative)
    cond = PromptEmbeddings(prompt[None], {"text_lengths": torch.tensor([n])})
    padded = torch.cat([negative, negative.new_zeros(n - m, negative.shape[1])])[None]
    uncond = PromptEmbeddings(padded, {"text_lengths": torch.tensor([m])}) if guidance != 1.0 else None
    return flow_denoise(
        base,
        cond,
        uncond,
        [ControlUnit(cn, x["condition"], 1.0)],
        x["latent_size"],
        steps,
        guidance,
        cuda_graphs=cuda_graphs,
        compile=compile,
    )


def peer(base: ZImageBase, cn: ZImageControlNet, x: dict[str, Any], steps: int, guidance: float) -> Any:
    """diffusers' pipeline over the same weights, built once; returns the call to time and the
    networks it runs every step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetModel, ZImageControlNetPipeline

    prompt = x["prompt"]
    with built_in(prompt.dtype, prompt.device):
        model = ZImageControlNetModel.from_config(diffusers_config(cn)).eval()
    model.load_state_dict(cn.state_dict())
    pipe = ZImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULE),
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        transformer=base.transformer,
        controlnet=model,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = x["latent_size"]
    noise = initial_noise((1, base.latent_channels, h, w), [0], prompt.device, torch.float32)

    def run() -> torch.Tensor:
        with torch.no_grad(), stock_blocks(pipe.transformer):  # diffusers' own blocks
            return pipe(
                prompt_embeds=[prompt],
                negative_prompt_embeds=[x["negative"]] if guidance != 1.0 else None,
                control_image=x["condition"] * 2 - 1,  # a tensor reaches its VAE as it is
                controlnet_conditioning_scale=1.0,
                height=h * base.vae_scale_factor,
                width=w * base.vae_scale_factor,
                num_inference_steps=steps,
                guidance_scale=guidance - 1,  # the pipeline's scale counts from 0
                latents=noise,
                output_type="latent",
            ).images

    return run, [pipe.transformer, pipe.controlnet]


def main() -> None:
    args = transformer_bench_args(__doc__, steps=9, size=1024, guidance=1.0)
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
        lambda steps, **kw: ours(base, cn, x, steps, args.guidance, **kw),
        (lambda: peer(base, cn, x, args.steps, args.guidance)) if args.peer else None,
        blocks=ZImageBase.blocks,
        release=lambda: release_graphs(base.transformer),
        fp8=lambda: base.use_fp8([cn]),
    )


if __name__ == "__main__":
    main()
