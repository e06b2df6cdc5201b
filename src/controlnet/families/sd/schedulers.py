"""The SD families' samplers: diffusers' noise schedulers over the DDPM schedule they were
trained with (scaled-linear betas, 1000 steps, epsilon or v prediction)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ...choices import Sampler, TimestepSpacing, check_spacing

__all__ = ["DDPMTraining", "make_scheduler"]


class DDPMTraining:
    """The training-time noising of the SD families: a timestep drawn uniformly from the DDPM
    schedule's, the latents noised by diffusers' ``DDPMScheduler``, and the regression target the
    schedule's (the noise, or v for v-prediction)."""

    def __init__(self, schedule: dict[str, Any]) -> None:
        self.scheduler = DDPMScheduler(**schedule)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def draw_noised(
        self, latents: torch.Tensor, noise: torch.Tensor, draws: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target) for clean ``latents`` and ``noise``; ``draws`` gives
        the timesteps (``randint``: the training loop's per-step random draws)."""
        t = draws.randint(self.scheduler.config.num_train_timesteps)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            return noisy, t, self.scheduler.get_velocity(latents, noise, t)
        return noisy, t, noise


def make_scheduler(
    sampler: Sampler | str,
    schedule: dict[str, Any],
    spacing: TimestepSpacing | str = TimestepSpacing.DEFAULT,
) -> SchedulerMixin:
    """A fresh diffusers scheduler for ``sampler`` over the model's training noise schedule, its
    steps spaced by ``spacing``."""
    check_spacing(sampler, spacing)
    sampler, spacing = Sampler.parse(sampler), TimestepSpacing.parse(spacing)
    common = {k: schedule[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    common["prediction_type"] = schedule.get("prediction_type", "epsilon")
    common["steps_offset"] = 1  # SD's released config (it moves leading timesteps only)
    if spacing is not TimestepSpacing.DEFAULT:
        common["timestep_spacing"] = spacing.value
    if sampler is Sampler.DDIM:
        # SD's released DDIM: (by default) leading spacing, no clipping, final alpha from step 0
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler is Sampler.UNIPC:
        return UniPCMultistepScheduler(**common)
    if sampler in (Sampler.DPMPP_2M, Sampler.DPMPP_2M_KARRAS, Sampler.DPMPP_2M_SDE_KARRAS):
        sde = sampler is Sampler.DPMPP_2M_SDE_KARRAS
        return DPMSolverMultistepScheduler(
            **common,
            algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
            solver_order=2,
            use_karras_sigmas=sampler is not Sampler.DPMPP_2M,
        )
    if sampler is Sampler.EULER:
        return EulerDiscreteScheduler(**common)
    if sampler is Sampler.LCM:
        # as diffusers' LCM pipelines make it from SD's released scheduler config
        return LCMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    return EulerAncestralDiscreteScheduler(**common)
