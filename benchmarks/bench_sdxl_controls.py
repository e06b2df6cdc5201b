"""SDXL generation speed with the control models people combine: a Union ControlNet with two
conditions (one pass), and a ControlNet with a T2I-Adapter, ours against diffusers' pipelines.

SDXL shapes (the UNet, a full ControlNet copied from it or a Union ControlNet of xinsir's
ProMax configuration, the SDXL T2I-Adapter), random weights, 1024x1024, 20 DDIM steps,
classifier-free guidance 7, bf16, batch 1. Both sides are timed from prompt embeddings and the
condition images to the final latents (text encoders left out; each side encodes its conditions
as its pipeline does). The peer for the Union case is StableDiffusionXLControlNetUnionPipeline;
for ControlNet + adapter, StableDiffusionXLControlNetPipeline whose UNet also takes the adapter's
features, computed once per image (what the community ControlNet-with-adapter pipelines do).

    python benchmarks/bench_sdxl_controls.py --case union --out results/union.json [--peer] [--tiny]
    python benchmarks/bench_sdxl_controls.py --case adapter --out results/adapter.json [--peer]

``--tiny``: a few-channel model on the CPU, to check the script itself (CI runs it).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compare_generation, diffusers_controlnet, open_zero, transformer_bench_args

from controlnet import ControlNet, ControlNetConfig, Family, unet_config
from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.sd.adapter import AdapterConfig, T2IAdapter
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import tiny_unet_config, vae_config
from controlnet.families.sd.union import UnionConfig, UnionControlNet
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import denoise, initial_noise
from controlnet.model.fastpath import release_graphs
from controlnet.text.tokenizer import clip_tokenizer

GUIDANCE = 7.0
TYPES = [0, 1]  # a ProMax Union ControlNet's pose and depth
STRENGTHS = [0.8, 0.6]
TINY_UNION = UnionConfig(8, 8, 2, 1, 8)
TINY_HINT = ControlNetConfig(hint_block_channels=(4, 8, 8, 16))


def build(case: str, tiny: bool, device: str, dtype: torch.dtype) -> tuple[UNetBase, list[torch.nn.Module]]:
    """An SDXL base (no text encoders: prompts come embedded) and the case's control models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        if tiny:
            unet = UNet2DConditionModel(**tiny_unet_config(Family.SDXL, cross_attention_dim=32))
            small = {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
            vae = AutoencoderKL(**{**vae_config(Family.SDXL), **small})
        else:
            unet = UNet2DConditionModel(**unet_config(Family.SDXL))
            vae = AutoencoderKL(**vae_config(Family.SDXL))
        widths = list(unet.config.block_out_channels)
        hint = TINY_HINT if tiny else None
        if case == "union":
            models: list[torch.nn.Module] = [
                UnionControlNet.from_unet(unet, hint, TINY_UNION if tiny else UnionConfig(8))
            ]
        else:
            adapter = T2IAdapter(  # one feature per encoder level and one after the middle block
                AdapterConfig(3, [*widths, widths[-1]], 1 if tiny else 2, 16, "full_adapter_xl")
            )
            models = [ControlNet.from_unet(unet, hint), adapter]
    for m in models:
        open_zero(m)
        m.to(dtype).eval()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    small = CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    base = UNetBase(  # the text encoders are never run: prompts come embedded
        Family.SDXL,
        unet,
        vae,
        CLIPTextModel(small),
        clip_tokenizer(Family.SDXL),
        text_encoder_2=CLIPTextModelWithProjection(small),
        tokenizer_2=clip_tokenizer(Family.SDXL, second=True),
    ).to(device, dtype)
    return base, models


def inputs(base: UNetBase, size: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    c = base.unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator().manual_seed(1)

    def embeds() -> PromptEmbeddings:
        return PromptEmbeddings(
            torch.randn(1, 77, c.cross_attention_dim, generator=g).to(device, dtype),
            {
                "text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype),
            },
        )

    return {
        "cond": embeds(),
        "uncond": embeds(),
        "conditions": [torch.rand(1, 3, size, size, generator=g).to(device, dtype) for _ in TYPES],
        "latent_size": base.latent_size((size, size)),
    }


def units(case: str, models: list[torch.nn.Module], x: dict[str, Any]) -> list[ControlUnit]:
    if case == "union":
        return [
            ControlUnit(models[0], image, s, control_type=t)
            for image, s, t in zip(x["conditions"], STRENGTHS, TYPES)
        ]
    return [ControlUnit(m, image, s) for m, image, s in zip(models, x["conditions"], STRENGTHS)]


def ours(case, base, models, x, steps: int, *, cuda_graphs: bool | None = None, compile: bool = False):
    return denoise(
        base,
        x["cond"],
        x["uncond"],
        units(case, models, x),
        sampler="ddim",
        steps=steps,
        guidance=GUIDANCE,
        seeds=[0],
        latent_size=x["latent_size"],
        progress=False,
        cuda_graphs=cuda_graphs,
        compile=compile,
    ).latents


def _diffusers_controlnet(base: UNetBase, model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' model holding ``model``'s weights: common.diffusers_controlnet for a plain
    ControlNet, a ControlNetUnionModel of the same configuration for a Union one."""
    if not isinstance(model, UnionControlNet):
        return diffusers_controlnet(base.unet, model)
    from diffusers import ControlNetUnionModel

    accepted = inspect.signature(ControlNetUnionModel.__init__).parameters
    fields = {k: v for k, v in base.unet.config.items() if k in accepted}
    fields["conditioning_embedding_out_channels"] = model.config.hint_block_channels
    with torch.device(base.device):
        theirs = ControlNetUnionModel(**fields, **model.union.to_dict())
    theirs.load_state_dict(model.state_dict())  # strict: our keys are diffusers'
    return theirs.to(base.dtype).eval()


def peer(case: str, base: UNetBase, models: list[torch.nn.Module], x: dict[str, Any], steps: int) -> Any:
    from diffusers import (
        DDIMScheduler,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLControlNetUnionPipeline,
    )
    from diffusers import T2IAdapter as DiffusersAdapter

    kind = (
        StableDiffusionXLControlNetUnionPipeline if case == "union" else StableDiffusionXLControlNetPipeline
    )
    pipe = kind(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=base.unet,
        controlnet=_diffusers_controlnet(base, models[0]),
        scheduler=DDIMScheduler(**base.schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = x["latent_size"]
    size = h * base.vae_scale_factor
    noise = initial_noise((1, 4, h, w), [0], base.device, torch.float32).to(base.dtype)
    plain_forward = base.unet.forward
    adapter = None
    if case == "adapter":
        with torch.device(base.device):
            adapter = DiffusersAdapter(**models[1].config.to_dict())
        adapter.load_state_dict(models[1].state_dict())
        adapter.to(base.dtype).eval()

    def run() -> torch.Tensor:
        common = dict(
            prompt_embeds=x["cond"].context,
            negative_prompt_embeds=x["uncond"].context,
            pooled_prompt_embeds=x["cond"].added["text_embeds"],
            negative_pooled_prompt_embeds=x["uncond"].added["text_embeds"],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            latents=noise,
            output_type="latent",
        )
        with torch.no_grad():
            if case == "union":
                return pipe(
                    control_image=x["conditions"],
                    control_mode=TYPES,
                    controlnet_conditioning_scale=STRENGTHS,
                    **common,
                ).images
            features = [f * STRENGTHS[1] for f in adapter(x["conditions"][1])]

            def with_adapter(*args: Any, **kwargs: Any) -> Any:
                batch = args[0].shape[0]
                kwargs["down_intrablock_additional_residuals"] = [
                    f.expand(batch, -1, -1, -1) for f in features
                ]
                return plain_forward(*args, **kwargs)

            base.unet.forward = with_adapter
            try:
                return pipe(
                    image=x["conditions"][0], controlnet_conditioning_scale=STRENGTHS[0], **common
                ).images
            finally:
                base.unet.forward = plain_forward

    return run, [pipe.unet, pipe.controlnet]


def main() -> None:
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--case", choices=["union", "adapter"], default="union")
    known, rest = pre.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = transformer_bench_args(__doc__)
    args.steps = 20 if args.steps == 28 else args.steps  # this family's 20 steps unless asked
    case = known.case
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 128 if args.tiny else args.size
    base, models = build(case, args.tiny, device, dtype)
    x = inputs(base, size, device, dtype)
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    record = compare_generation(
        args,
        device,
        dtype,
        size,
        lambda steps, **kw: ours(case, base, models, x, steps, **kw),
        (lambda: peer(case, base, models, x, args.steps)) if args.peer else None,
        blocks=(BasicTransformerBlock, ResnetBlock2D),
        release=lambda: release_graphs(base.unet),
    )
    record["case"] = case


if __name__ == "__main__":
    main()
