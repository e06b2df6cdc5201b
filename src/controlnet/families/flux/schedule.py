"""Flow matching for Flux.1: the Euler sampler over a shifted schedule, in the sampling loop's terms.

The model moves along x_t = (1 - s) x_0 + s e and predicts e - x_0; a step is
x_{s'} = x_s + (s' - s) v. The noise levels run from 1 down to 1/N evenly, then shift towards
noise by ``mu``, which grows with the image's token count (Flux.1's resolution-dependent shift:
0.5 at 256 tokens, 1.15 at 4096, linear between). diffusers' ``FlowMatchEulerDiscreteScheduler``
does the arithmetic; :class:`FlowMatchSampler` gives it the interface the generic loop calls
(``set_timesteps(steps)``, ``scale_model_input``, ``add_noise``, ``init_noise_sigma``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ...choices import Sampler, TimestepSpacing

__all__ = ["FLUX_SCHEDULE", "FlowMatchSampler", "image_shift"]

#: Flux.1's scheduler config (diffusers' scheduler_config.json of FLUX.1-dev)
FLUX_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def image_shift(tokens: int, schedule: dict[str, Any] = FLUX_SCHEDULE) -> float:
    """``mu`` for an image of ``tokens`` packed latent tokens: linear in the token count."""
    lo, hi = schedule["base_image_seq_len"], schedule["max_image_seq_len"]
    slope = (schedule["max_shift"] - schedule["base_shift"]) / (hi - lo)
    return tokens * slope + schedule["base_shift"] - slope * lo


class FlowMatchSampler:
    """Euler over the flow-matching schedule of an image of ``tokens`` tokens."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, tokens: int, schedule: dict[str, Any] = FLUX_SCHEDULE) -> None:
        self.inner = FlowMatchEulerDiscreteScheduler(**schedule)
        self.mu = image_shift(tokens, schedule) if schedule.get("use_dynamic_shifting") else None

    @classmethod
    def make(
        cls,
        sampler: Sampler | str,
        spacing: TimestepSpacing | str,
        tokens: int,
        schedule: dict[str, Any] = FLUX_SCHEDULE,
    ) -> FlowMatchSampler:
        if Sampler.parse(sampler) is not Sampler.EULER:
            raise ValueError(
                f"sampler {Sampler.parse(sampler).value!r}: a flow-matching model samples with 'euler'"
            )
        if TimestepSpacing.parse(spacing) is not TimestepSpacing.DEFAULT:
            raise ValueError(
                "timestep spacing: a flow-matching model's steps follow its own shifted schedule"
            )
        return cls(tokens, schedule)

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        self.inner.set_timesteps(steps, device=device, sigmas=sigmas, mu=self.mu)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.inner.timesteps

    def set_begin_index(self, index: int) -> None:
        self.inner.set_begin_index(index)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def add_noise(self, source: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The source moved to the noise level of ``timesteps`` (img2img's start, masked editing)."""
        return self.inner.scale_noise(source, timesteps.to(source.device), noise)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, **_: Any) -> Any:
        return self.inner.step(model_output, timestep, sample)
