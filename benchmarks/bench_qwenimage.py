"""Qwen-Image generation speed with a ControlNet: ours against diffusers'
QwenImageControlNetPipeline.

Qwen-Image's transformer at its released shape (60 double-stream blocks, 3072 wide: 20.4 billion
parameters) with random weights, a Union-sized ControlNet of 5 blocks, 1328x1328 (its native
size), 50 steps, true classifier-free guidance 4, bf16, batch 1. Both are timed from prompt
embeddings and the condition image to the final latents (the Qwen2.5-VL text encoder is left
out; the condition's one VAE pass is in both). The prompt is 64 tokens and the negative prompt 6
(the model card's single space under the template): both run the two halves one after the other,
each at its own length. The arithmetic per step is
counted and set against the bf16 matmul peak measured in the same run.

    python benchmarks/bench_qwenimage.py --peer --out results/qwenimage.json   # about 8 minutes, H100
    python benchmarks/bench_qwenimage.py --tiny --peer                          # CPU: the script itself
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_flux import _NoText
from common import built_in, compare_generation, flow_denoise, transformer_bench_args

from controlnet.families.dit import pack, unpack
from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.qwenimage import QwenImageControlNet, QwenImageControlNetConfig
from controlnet.families.qwenimage.base import QWEN_SCHEDULE, QwenImageBase
from controlnet.families.qwenimage.fused import stock_blocks
from controlnet.formats.dit_controlnet import diffusers_config
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import initial_noise
from controlnet.model.fastpath import release_graphs

GUIDANCE = 4.0
PROMPT_TOKENS, NEGATIVE_TOKENS = 64, 6
TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "axes_dims_rope": (2, 2, 4),
}
TINY_VAE = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False] * 2,
    "latents_mean": [0.1, -0.2, 0.3, 0.0],
    "latents_std": [1.5, 0.8, 2.0, 1.1],
}


def build(tiny: bool, device: str, dtype: torch.dtype) -> tuple[QwenImageBase, QwenImageControlNet]:
    """The base (released shapes unless ``tiny``) built straight in ``dtype`` on ``device`` (20.4
    billion parameters do not fit an 80 GB card in float32), and the ControlNet copied from it."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    torch.manual_seed(0)
    with built_in(dtype, device):
        transformer = QwenImageTransformer2DModel(**(TINY if tiny else {})).eval()
        vae = AutoencoderKLQwenImage(**(TINY_VAE if tiny else {})).eval()
    c = vae.config.z_dim
    with torch.no_grad():  # a posterior of no spread: the pipeline samples the condition's latents
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(-1000.0)
    base = QwenImageBase(transformer, vae, _NoText(), None)
    cn = base.new_controlnet(QwenImageControlNetConfig(num_layers=2 if tiny else 5)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_x_embedder")):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return base, cn


def inputs(base: QwenImageBase, size: int, tiny: bool, device: str, dtype: torch.dtype) -> dict[str, Any]:
    width = base.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(3)
    n, m = (8, 3) if tiny else (PROMPT_TOKENS, NEGATIVE_TOKENS)
    prompt = torch.randn(1, n, width, generator=g).to(device, dtype)
    negative = torch.randn(1, m, width, generator=g).to(device, dtype)
    return {
        "prompt": prompt,
        "negative": negative,
        "condition": torch.rand(1, 3, size, size, generator=g).to(device, dtype),
        "latent_size": base.latent_size((size, size)),
    }


def ours(
    base: QwenImageBase,
    cn: QwenImageControlNet,
    x: dict[str, Any],
    steps: int,
    *,
    cuda_graphs: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """As generate encodes them: the two prompts padded to one width, each with its own length."""
    prompt, negative = x["prompt"], x["negative"]
    n, m = prompt.shape[1], negative.shape[1]
    padded = torch.cat([negative, negative.new_zeros(1, n - m, negative.shape[2])], dim=1)
    cond = PromptEmbeddings(prompt, {"text_lengths": torch.tensor([n])})
    uncond = PromptEmbeddings(padded, {"text_lengths": torch.tensor([m])})
    return flow_denoise(
        base,
        cond,
        uncond,
        [ControlUnit(cn, x["condition"], 1.0)],
        x["latent_size"],
        steps,
        GUIDANCE,
        cuda_graphs=cuda_graphs,
        compile=compile,
    )


def peer(base: QwenImageBase, cn: QwenImageControlNet, x: dict[str, Any], steps: int) -> Any:
    """diffusers' pipeline over the same weights, built once; returns the call to time and the
    networks it runs every step."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageControlNetModel,
        QwenImageControlNetPipeline,
    )

    prompt = x["prompt"]
    with built_in(prompt.dtype, prompt.device):
        model = QwenImageControlNetModel.from_config(diffusers_config(cn)).eval()
    model.load_state_dict(cn.state_dict())
    pipe = QwenImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULE),
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        transformer=base.transformer,
        controlnet=model,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = x["latent_size"]
    noise = initial_noise((1, base.latent_channels, h, w), [0], prompt.device, torch.float32)

    def ones(t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape[:2], device=t.device, dtype=torch.long)

    def run() -> torch.Tensor:
        with torch.no_grad(), stock_blocks(pipe.transformer):  # diffusers' own blocks
            out = pipe(
                prompt_embeds=prompt,
                prompt_embeds_mask=ones(prompt),
                negative_prompt_embeds=x["negative"],
                negative_prompt_embeds_mask=ones(x["negative"]),
                control_image=x["condition"] * 2 - 1,  # a tensor reaches its VAE as it is
                controlnet_conditioning_scale=1.0,
                height=h * base.vae_scale_factor,
                width=w * base.vae_scale_factor,
                num_inference_steps=steps,
                true_cfg_scale=GUIDANCE,
                latents=pack(noise).to(prompt.dtype),
                output_type="latent",
            ).images
        return unpack(out, h, w)

    return run, [pipe.transformer, pipe.controlnet]


def main() -> None:
    args = transformer_bench_args(__doc__, steps=50, size=1328)
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
        blocks=QwenImageBase.blocks,
        release=lambda: release_graphs(base.transformer),
        fp8=lambda: base.use_fp8([cn]),
    )


if __name__ == "__main__":
    main()
