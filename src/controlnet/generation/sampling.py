"""Sampling: the one generation path, from prompts to images, and the loop over a model callable.

:func:`render` (prompts, controls and seeds in; latents out) and :func:`to_images` are the path
that :func:`controlnet.generation.generate.generate` (each pass of it), the evaluation and
validation during training all take, so that an evaluation measures exactly what ``controlnet
generate`` makes for the same prompt, condition, seed and settings: the same prompt encoding (the
prompt syntax; a negative prompt only when guidance uses it), the same denoising and the same
decoding to 8-bit pixels.

:func:`sample` is the plain loop (k-diffusion's shape): a model callable, a diffusers scheduler and
latents in, latents out; it knows nothing of controls, guidance or CUDA graphs. :func:`denoise`
composes the callable for one generation - the base with its controls, classifier-free guidance
and CUDA graphs wrapped around it (:mod:`controlnet.generation.denoiser`) - and runs the loop from
seeded noise, or part-way from an image (img2img), keeping the source outside a mask. Everything
that can be done once (prompt embeddings, hint features, the mask at latent size) is done before
the first step.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from ..choices import PromptSyntax, Sampler, TimestepSpacing, check_steps
from ..families.protocol import BaseModel, PromptEmbeddings
from ..imageio import to_uint8
from ..model.fastpath import compile_modules, has_own_graphs, step_graphs, weights_key
from .denoiser import ControlledDenoiser, ControlUnit, Graphed, Guided, PreparedControl, StepModel
from .watch import Watch

__all__ = [
    "DenoiseResult",
    "SampleFn",
    "Sampling",
    "denoise",
    "initial_noise",
    "mask_to_latent",
    "render",
    "sample",
    "step_generators",
    "steps_run",
    "to_images",
]


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
    true_guidance: float = 1.0  # classifier-free guidance of a guidance-distilled model
    guidance_end: float = 1.0  # guidance only up to this far along (1 - t / T)
    guidance_renorm: float = 0.0  # the guided prediction's norm capped at this x the conditional's

    @classmethod
    def of(cls, request: Any) -> Sampling:
        """The sampling settings of a generation request."""
        return cls(
            request.sampler,
            request.timestep_spacing,
            request.steps,
            request.guidance,
            request.eta,
            request.true_guidance,
            request.guidance_end,
            request.guidance_renorm,
        )


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
    # a model that reads the guidance scale as an input (guidance-distilled) gets it there; its
    # classifier-free guidance, if any, is the true guidance
    cfg = sampling.true_guidance if base.guidance_input else sampling.guidance
    if not base.guidance_input and sampling.true_guidance != 1.0:
        raise ValueError(
            "true_guidance: only a guidance-distilled model (Flux.1-dev) takes one; give guidance"
        )
    cond, uncond = base.encode_prompts(prompts, negatives if cfg != 1.0 else None, size=size, syntax=syntax)
    if base.guidance_input:
        scale = torch.full((len(cond),), float(sampling.guidance), device=cond.context.device)
        cond = PromptEmbeddings(cond.context, {**(cond.added or {}), "guidance": scale})
        if uncond is not None:
            uncond = PromptEmbeddings(uncond.context, {**(uncond.added or {}), "guidance": scale})
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
        guidance=cfg,
        guidance_end=sampling.guidance_end,
        guidance_renorm=sampling.guidance_renorm,
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


def initial_noise(
    shape: Sequence[int], seeds: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian noise, one CPU generator per sample (sample i from seeds[i]), so a seed gives the
    same image whatever the batch, device or dtype."""
    noise = [torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """CPU generators of the noise the stochastic samplers (Euler a, DPM++ 2M SDE, DDIM with eta)
    draw at each step: one per sample, apart from the initial noise's."""
    return [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]


@dataclass
class DenoiseResult:
    latents: torch.Tensor
    steps_run: int
    seconds: float
    control_calls: dict[int, int] = field(default_factory=dict)  # unit index -> steps it ran


def steps_run(steps: int, denoise_strength: float) -> int:
    """How many of ``steps`` an img2img pass at ``denoise_strength`` runs: the last ones, at least one."""
    return max(1, round(steps * denoise_strength))


@torch.no_grad()
def denoise(
    base: BaseModel,
    cond: PromptEmbeddings,
    uncond: PromptEmbeddings | None,
    controls: Sequence[ControlUnit],
    *,
    sampler: Sampler | str = Sampler.DDIM,
    timestep_spacing: TimestepSpacing | str = TimestepSpacing.DEFAULT,
    steps: int = 20,
    guidance: float = 9.0,
    guidance_end: float = 1.0,
    guidance_renorm: float = 0.0,
    eta: float = 0.0,
    seeds: Sequence[int],
    latent_size: tuple[int, int],
    init_latents: torch.Tensor | None = None,
    denoise_strength: float = 1.0,
    mask: torch.Tensor | None = None,
    progress: bool = True,
    progress_label: str = "denoising",
    callback: Callable[[int, int], None] | None = None,
    watch: Watch | None = None,
    cuda_graphs: bool | None = None,
    compile: bool = False,
    concurrent_controls: bool = True,
) -> DenoiseResult:
    """Sample latents: the model callable (the base with its controls, wrapped in classifier-free
    guidance and CUDA graphs as this call asks) run by :func:`sample` from seeded noise.

    Args:
        cond / uncond: prompt embeddings of the B samples (uncond None: no classifier-free guidance).
        guidance_end: guidance only at the steps at most this far along (1 - t / the schedule's
            training length); later ones run the conditional half alone.
        guidance_renorm: the guided prediction's norm capped at this multiple of the conditional
            prediction's, per sample (0: no cap).
        seeds: one per sample; sample i's noise (and its scheduler noise) come from seeds[i].
        latent_size: (h, w) of the latents.
        init_latents: img2img source latents (B or 1, C, h, w); ``denoise_strength`` in (0, 1] is
            the fraction of the schedule that is run (1 = start from pure noise).
        mask: (1 or B, 1, h, w) in [0, 1] at latent size; 1 = regenerate, 0 = keep the source.
            The kept region follows the source latents, noised to the current level, every step.
        progress / progress_label: a progress bar (steps, it/s, ETA) and its label.
        watch: told of each step (with a preview when asked); a stop it was given ends the
            sampling after the current step, with the latents as they are.
        cuda_graphs: replay each step's model call from a CUDA graph (None: on CUDA devices).
        compile: also torch.compile the UNet and ControlNets (the fast path; slow first call).
        concurrent_controls: run several ControlNets of a step on parallel CUDA streams (no
            effect elsewhere, nor with networks compiled in reduce-overhead mode); the results are
            the same either way.
    """
    check_steps(sampler, steps)
    if not 0.0 < denoise_strength <= 1.0:
        raise ValueError(f"denoise strength must be in (0, 1], got {denoise_strength}")
    if not 0.0 <= guidance_end <= 1.0 or guidance_renorm < 0:
        raise ValueError(
            f"guidance_end must be in [0, 1] and guidance_renorm >= 0, got {guidance_end}, {guidance_renorm}"
        )
    if mask is not None and init_latents is None:
        raise ValueError("a mask needs an init image (the source whose unmasked region is kept)")
    batch, device, dtype = len(seeds), base.device, base.dtype
    use_cfg = uncond is not None and guidance != 1.0
    scheduler = base.scheduler(sampler, timestep_spacing, latent_size=latent_size)
    scheduler.set_timesteps(steps, device=device)
    first = steps - steps_run(steps, denoise_strength) if init_latents is not None else 0
    timesteps = scheduler.timesteps[first * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * scheduler.order)
    total = len(timesteps)

    shape = (batch, base.latent_channels, *latent_size)
    noise = initial_noise(shape, seeds, device, torch.float32)
    latents = noise * scheduler.init_noise_sigma
    keep = None
    if init_latents is not None:
        source = init_latents.to(device=device, dtype=torch.float32).expand(shape)
        if first > 0:  # img2img: start part-way, from the source noised to that level
            latents = scheduler.add_noise(source, noise, timesteps[:1])
        if mask is not None:
            keep = _kept_outside(
                mask.to(device=device, dtype=torch.float32), source, noise, scheduler, timesteps
            )

    networks = [base.denoiser, *(u.controlnet for u in controls)]
    if compile:
        base.compile()
        compile_modules(networks[1:])
    own_graphs = has_own_graphs(networks)
    # networks that replay inductor's CUDA graphs (compiled for training in reduce-overhead mode)
    # allocate from one memory pool that inductor fills from a single stream; side streams are
    # outside what it supports (a validation run during such training, with side streams, drew
    # NaN images), so they run one after the other
    concurrent = concurrent_controls and not own_graphs
    prepared = [PreparedControl.build(u, batch, device, dtype, base) for u in controls]
    embeds = PromptEmbeddings.cat([uncond, cond]) if use_cfg else cond  # type: ignore[list-item]
    controlled = ControlledDenoiser(base, prepared, embeds, total, cfg_batch=use_cfg, concurrent=concurrent)
    denoisers = [controlled]
    model: StepModel = controlled
    if use_cfg:
        length = scheduler.config.num_train_timesteps
        guided = [1 - t / length <= guidance_end for t in timesteps.tolist()]
        alone = None
        if not all(guided):  # the steps past the guidance's end: the conditional half alone
            alone = ControlledDenoiser(base, prepared, cond, total, cfg_batch=False, concurrent=concurrent)
            denoisers.append(alone)
        # a family may combine the two predictions its own way (Qwen-Image rescales the result)
        combine = getattr(base, "combine_guidance", None)
        model = Guided(controlled, guidance, combine, alone=alone, guided=guided, renorm=guidance_renorm)
    if (cuda_graphs if cuda_graphs is not None else device.type == "cuda") and not own_graphs:
        # what a step's graph depends on besides its inputs and plan: weights, guidance, streams
        key = (weights_key(networks), use_cfg, guidance, guidance_renorm, concurrent)
        model = Graphed(model, step_graphs(base.denoiser, device), key)

    start = time.perf_counter()
    latents = sample(
        model,
        scheduler,
        latents,
        timesteps,
        dtype=dtype,
        step_kwargs=_step_kwargs(scheduler, eta, step_generators(seeds)),
        after_step=keep,
        progress=progress,
        progress_label=progress_label,
        callback=callback,
        watch=watch,
    )
    done = total if watch is None or watch.stopped_at is None else watch.stopped_at[0] - watch.offset
    calls = {k: sum(d.calls[k] for d in denoisers) for k in controlled.calls}
    return DenoiseResult(latents.to(dtype), done, time.perf_counter() - start, calls)


def sample(
    model: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    dtype: torch.dtype,
    step_kwargs: dict[str, Any],
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    progress_label: str = "denoising",
    callback: Callable[[int, int], None] | None = None,
    watch: Watch | None = None,
) -> torch.Tensor:
    """The sampling loop: for each timestep, the model's prediction ``model(x, t, step)`` and one
    scheduler step; ``after_step(step, latents)`` may change the latents (masked editing keeps the
    source outside the mask). Latents stay float32; the model gets them in ``dtype``. ``watch``
    hears of each step (a preview shows the clean image the step predicts, where the sampler says)
    and may end the loop early."""
    bar = tqdm(total=len(timesteps), desc=progress_label, unit="step", disable=not progress, leave=False)
    # the scheduler gets each timestep as a CPU tensor: DDIM looks its noise level up in a CPU
    # table by the timestep, which for a GPU tensor would wait for the GPU every step. The model
    # gets them as float32 (a UNet embeds them so whatever their dtype): one dtype for every
    # sampler's timesteps lets them share graphs
    for i, (t, t_host) in enumerate(zip(timesteps.float(), timesteps.cpu())):
        x = scheduler.scale_model_input(latents, t_host).to(dtype)
        eps = model(x, t, i)
        out = scheduler.step(eps, t_host, latents, **step_kwargs)
        latents = out.prev_sample
        if after_step is not None:
            latents = after_step(i, latents)
        bar.update(1)
        if callback is not None:
            callback(i + 1, len(timesteps))
        if watch is not None:
            estimate = getattr(out, "pred_original_sample", None)
            watch.stepped(i + 1, latents if estimate is None else estimate)
            if watch.stopping and i + 1 < len(timesteps):
                watch.ended_early(i + 1)
                if estimate is not None:  # what it has: the clean image this step predicts
                    latents = estimate
                break
    bar.close()
    return latents


def _kept_outside(
    mask: torch.Tensor,
    source: torch.Tensor,
    noise: torch.Tensor,
    scheduler: SchedulerMixin,
    timesteps: torch.Tensor,
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Masked editing: after step i, outside ``mask`` the latents are the source's, noised to the
    next step's level (the last step: the source itself)."""

    def keep(i: int, latents: torch.Tensor) -> torch.Tensor:
        last = i == len(timesteps) - 1
        kept = source if last else scheduler.add_noise(source, noise, timesteps[i + 1 : i + 2])
        return mask * latents + (1 - mask) * kept

    return keep


def _step_kwargs(scheduler: SchedulerMixin, eta: float, generators: list[torch.Generator]) -> dict[str, Any]:
    """Keyword arguments of this scheduler's ``step``: eta for DDIM, per-sample generators for the
    schedulers that draw noise."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def mask_to_latent(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) in [0, 1] -> latent mask (B, 1, h, w): a latent cell is regenerated
    when any pixel in it is masked, so the whole masked area is regenerated."""
    return (F.adaptive_max_pool2d(mask.float(), latent_size) > 0.5).float()
