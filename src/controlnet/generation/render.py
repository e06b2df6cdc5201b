"""The one generation path: prompts, controls and seeds in; latents and images out.

:func:`controlnet.generation.generate.generate` (every pass of it), the evaluation
(:mod:`controlnet.evaluation.evaluate`) and validation during training
(:mod:`controlnet.training.validation`) all make their images here, so that an evaluation
measures exactly what ``controlnet generate`` makes for the same prompt, condition, seed and
settings: the same prompt encoding (the prompt syntax, a negative prompt only when guidance uses
it), the same denoising (:func:`~controlnet.generation.sampling.denoise`) and the same decoding
to 8-bit pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..choices import PromptSyntax, Sampler, TimestepSpacing
from ..families.protocol import BaseModel, PromptEmbeddings
from ..imageio import to_uint8
from .denoiser import ControlUnit
from .sampling import DenoiseResult, denoise

__all__ = ["SampleFn", "Sampling", "render", "to_images"]

#: (prompt embeddings, negative embeddings or None, seeds, latent size) -> latents: sampling for a
#: model that takes its condition another way than a ControlNet (the ``concat`` ablation)
SampleFn = Callable[[PromptEmbeddings, "PromptEmbeddings | None", list[int], tuple[int, int]], torch.Tensor]


@dataclass(frozen=True)
class Sampling:
    """How the steps are taken: a request's, an evaluation's and validation's alike."""

    sampler: Sampler | str = Sampler.DDIM
    timestep_spacing: TimestepSpacing | str = TimestepSpacing.DEFAULT
    steps: int = 20
    guidance: float = 9.0
    eta: float = 0.0

    @classmethod
    def of(cls, request: Any) -> Sampling:
        """The sampling settings of a generation request."""
        return cls(request.sampler, request.timestep_spacing, request.steps, request.guidance, request.eta)


@torch.no_grad()
def render(
    base: BaseModel,
    units: Sequence[ControlUnit],
    prompts: Sequence[str],
    negatives: Sequence[str],
    seeds: Sequence[int],
    size: tuple[int, int],
    sampling: Sampling,
    *,
    syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
    steps: int | None = None,
    init_latents: torch.Tensor | None = None,
    denoise_strength: float = 1.0,
    mask: torch.Tensor | None = None,
    sample_fn: SampleFn | None = None,
    **options: Any,
) -> DenoiseResult:
    """Latents of images of ``size`` (H, W), sample i from ``prompts[i]``, ``negatives[i]`` and
    ``seeds[i]`` with the controls ``units`` (their conditions batch 1 or one per sample).

    The negative prompts are encoded only when guidance uses them (guidance 1: none is).
    ``steps`` overrides the sampling's (the hires fix's second pass); ``init_latents``,
    ``denoise_strength`` and ``mask`` make it img2img or masked editing; ``sample_fn`` samples in
    place of the ControlNet path (``units`` empty); other ``options`` go to
    :func:`~controlnet.generation.sampling.denoise` (progress, callback, compile, ...).
    """
    guided = sampling.guidance != 1.0
    cond, uncond = base.encode_prompts(prompts, negatives if guided else None, size=size, syntax=syntax)
    latent_size = base.latent_size(size)
    if sample_fn is not None:
        if units:
            raise ValueError("sample_fn samples without ControlNets; give no control units")
        latents = sample_fn(cond, uncond, list(seeds), latent_size)
        return DenoiseResult(latents, sampling.steps, 0.0)
    return denoise(
        base,
        cond,
        uncond,
        units,
        sampler=sampling.sampler,
        timestep_spacing=sampling.timestep_spacing,
        steps=steps or sampling.steps,
        guidance=sampling.guidance,
        eta=sampling.eta,
        seeds=seeds,
        latent_size=latent_size,
        init_latents=init_latents,
        denoise_strength=denoise_strength,
        mask=mask,
        **options,
    )


def to_images(base: BaseModel, latents: torch.Tensor, *, tiled: bool = False) -> list[np.ndarray]:
    """Latents decoded to (H, W, 3) uint8 images (``tiled``: the VAE works in tiles)."""
    return [to_uint8(p) for p in base.decode_latents(latents, tiled=tiled)]
