"""Flow matching, in the sampling loop's terms: the Euler sampler over a (shifted) schedule.

The model moves along x_t = (1 - s) x_0 + s e and predicts e - x_0; a step is
x_{s'} = x_s + (s' - s) v. diffusers' ``FlowMatchEulerDiscreteScheduler`` does the arithmetic for
the family's schedule (a fixed shift, SD3's 3.0; or a shift ``mu`` that grows with the image's
token count, Flux.1's, whose levels then run evenly from 1 to 1/N before shifting);
:class:`FlowMatchSampler` gives it the interface the generic loop calls (``set_timesteps(steps)``,
``scale_model_input``, ``add_noise``, ``init_noise_sigma``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..choices import Sampler, TimestepSpacing

__all__ = ["FlowMatchSampler", "FlowMatchTraining", "image_shift"]


def image_shift(tokens: int, schedule: dict[str, Any]) -> float:
    """``mu`` for an image of ``tokens`` packed latent tokens: linear in the token count."""
    lo, hi = schedule["base_image_seq_len"], schedule["max_image_seq_len"]
    slope = (schedule["max_shift"] - schedule["base_shift"]) / (hi - lo)
    return tokens * slope + schedule["base_shift"] - slope * lo


class FlowMatchSampler:
    """Euler over the flow-matching ``schedule`` (diffusers' scheduler config) of an image of
    ``tokens`` tokens."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, tokens: int, schedule: dict[str, Any], *, linear_sigmas: bool = False) -> None:
        self.schedule, self.linear_sigmas = schedule, linear_sigmas
        self.inner = self._full = FlowMatchEulerDiscreteScheduler(**schedule)
        self.mu = image_shift(tokens, schedule) if schedule.get("use_dynamic_shifting") else None

    @classmethod
    def make(
        cls,
        sampler: Sampler | str,
        spacing: TimestepSpacing | str,
        tokens: int,
        schedule: dict[str, Any],
        *,
        linear_sigmas: bool = False,
    ) -> FlowMatchSampler:
        """``linear_sigmas``: the levels 1 .. 1/steps, evenly, then shifted (Flux's, Qwen-Image's and
        Z-Image's pipelines), where a fixed shift otherwise takes the scheduler's own spacing (SD3)."""
        if Sampler.parse(sampler) is not Sampler.EULER:
            raise ValueError(
                f"sampler {Sampler.parse(sampler).value!r}: a flow-matching model samples with 'euler'"
            )
        if TimestepSpacing.parse(spacing) is not TimestepSpacing.DEFAULT:
            raise ValueError(
                "timestep spacing: a flow-matching model's steps follow its own shifted schedule"
            )
        return cls(tokens, schedule, linear_sigmas=linear_sigmas)

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        self.inner = self._full
        if steps == 1 and self.schedule.get("shift_terminal"):
            # stretching one level (1.0) to end at shift_terminal divides 0 by 0: diffusers' scheduler
            # would give NaN; a single step goes from pure noise to the end, stretched or not
            self.inner = FlowMatchEulerDiscreteScheduler(**{**self.schedule, "shift_terminal": None})
        if self.mu is None and not self.linear_sigmas:  # a fixed shift: the scheduler's own spacing
            self.inner.set_timesteps(steps, device=device)
            return
        sigmas = np.linspace(1.0, 1 / steps, steps)
        self.inner.set_timesteps(steps, device=device, sigmas=sigmas, mu=self.mu)

    @property
    def config(self) -> Any:
        """The scheduler's config (``num_train_timesteps``: the length timesteps count in)."""
        return self.inner.config

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


class FlowMatchTraining:
    """The training-time noising of a flow-matching family: the level s of each sample drawn
    logit-normal (sigmoid of a standard normal: the SD3 paper's choice, which weights the middle
    levels), then shifted as the family samples - a fixed ``shift`` (SD3's 3.0), or Flux.1's shift
    ``mu`` for the image's token count (s -> e^mu / (e^mu + 1/s - 1)); x_s = (1 - s) x_0 + s e,
    and the network regresses the velocity e - x_0 at timestep 1000 s."""

    prediction_type = "flow"

    def __init__(self, schedule: dict[str, Any]) -> None:
        self.schedule = dict(schedule)

    def levels(self, normal: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Noise levels s in (0, 1) from standard-normal draws ``normal`` (B,), for latents of
        ``latent_size`` (h, w) (whose 2x2 patches set Flux.1's shift)."""
        u = torch.sigmoid(normal.double())
        if self.schedule.get("use_dynamic_shifting"):
            h, w = latent_size
            mu = image_shift((h // 2) * (w // 2), self.schedule)
            return (np.exp(mu) / (np.exp(mu) + (1 / u - 1))).float()
        shift = float(self.schedule.get("shift", 1.0))
        return (shift * u / (1 + (shift - 1) * u)).float()

    def draw_noised(
        self, latents: torch.Tensor, noise: torch.Tensor, draws: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`noised` at levels from ``draws`` (``randn``: the training loop's per-step draws)."""
        return self.noised(latents, noise, draws.randn())

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, normal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_s, timesteps 1000 s, the velocity target) for clean ``latents`` and ``noise``."""
        s = self.levels(normal, tuple(latents.shape[-2:])).to(latents.device)  # type: ignore[arg-type]
        sb = s.view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
        return (1 - sb) * latents + sb * noise, s * 1000, noise - latents
