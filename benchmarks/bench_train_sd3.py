"""Training speed and memory of an SD3 / SD3.5 ControlNet: our loop against diffusers'
``examples/controlnet/train_controlnet_sd3.py`` step, in one command - the measurement of
``bench_train_flux.py`` (the same options and rows) on SD3.5-medium.

SD3.5-medium shapes (24 MMDiT blocks, random weights), the recipe's ControlNet (12 blocks, what
``SD3ControlNetModel.from_transformer`` copies by default), bf16 base and VAE, float32 ControlNet
under bf16 autocast, AdamW, the recipe's text context (CLIP's 77 tokens beside T5's 77: its
``--max_sequence_length`` default); 512x512 (its default resolution) or 1024x1024. The peer is the
recipe's step as published: both images through the VAE every step, logit-normal timesteps from
the scheduler's grid (each one's sigma found by a search on the host), the output preconditioned
into a clean-latent estimate and regressed on the latents with the logit-normal loss weighting
(``--precondition_outputs 1``, ``--weighting_scheme logit_normal``), clipping at 1.0. Ours
regresses the velocity itself (the arithmetic is the same) in the real ``train`` loop on items
shaped like a latent cache's.

    python benchmarks/bench_train_sd3.py --out results/train-sd3.json --peer [--size 1024]
        [--batch 1] [--checkpointing] [--largest-batch] [--profile] [--compile default]
    python benchmarks/bench_train_sd3.py --smoke     # tiny shapes on the CPU: checks the script
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train_flux
from bench_sd3 import build_base
from bench_train_flux import Case, recipe_controlnet

from controlnet.families.sd3 import SD3ControlNetConfig
from controlnet.families.sd3.base import SD3_SCHEDULE, SD3Base

RECIPE_TEXT = 77 + 77  # CLIP's tokens, then T5's at the recipe's --max_sequence_length


def _copied() -> SD3ControlNetConfig:
    """The ControlNet trained: the recipe's 12 blocks (one for the smoke test's model)."""
    return SD3ControlNetConfig(num_layers=1 if bench_train_flux.SMOKE else 12)


def sd3_case() -> Case:
    from controlnet.families.sd3.fused import stock_blocks

    smoke = bench_train_flux.SMOKE
    dtype = torch.float32 if smoke else torch.bfloat16
    base = build_base(smoke, "cpu" if smoke else "cuda", dtype)
    text = 8 if smoke else RECIPE_TEXT
    return Case(base, _copied(), text, lambda b, size: recipe_step(base, b, size, text), stock_blocks)


def recipe_step(base: SD3Base, batch: int, size: int, text: int) -> Callable[[], None]:
    """The SD3 recipe's training step, as published, over diffusers' SD3ControlNetModel (the same
    starting copy as ours) and the same locked transformer and VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    smoke = bench_train_flux.SMOKE
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    t = dict(base.transformer.config)
    copied = _copied()
    cn = recipe_controlnet(
        SD3ControlNetModel,
        base,
        copied,
        num_layers=copied.num_layers,
        force_zeros_for_pooled_projection=copied.zero_pooled,
    )
    opt = torch.optim.AdamW(cn.parameters(), lr=5e-6, weight_decay=1e-2)  # the recipe's defaults
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE)  # the copy it draws timesteps from
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    control = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    context = torch.randn(batch, text, t["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(batch, t["pooled_projection_dim"], generator=g).to(device, dtype)
    vae = base.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    grid, sigmas_of = scheduler.timesteps.to(device), scheduler.sigmas.to(device, dtype)

    def latents(images: torch.Tensor) -> torch.Tensor:
        return (vae.encode(images).latent_dist.sample() - shift) * scale

    def step() -> None:
        x = latents(pixels)
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0)
        timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()].to(device)
        at = [(grid == s).nonzero().item() for s in timesteps]  # the recipe's get_sigmas
        sigmas = sigmas_of[at].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x + sigmas * noise
        hint = latents(control)
        kw = dict(
            timestep=timesteps, encoder_hidden_states=context, pooled_projections=pooled, return_dict=False
        )
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not smoke):
            res = cn(hidden_states=noisy, controlnet_cond=hint, **kw)[0]
        pred = base.transformer(
            hidden_states=noisy, block_controlnet_hidden_states=[r.to(dtype) for r in res], **kw
        )[0]
        pred = pred * (-sigmas) + noisy  # preconditioned: a clean-latent estimate
        weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas)
        loss = (weighting.float() * (pred.float() - x.float()) ** 2).reshape(batch, -1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    bench_train_flux.main(sd3_case, "train-sd3.json")
