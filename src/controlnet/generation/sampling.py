"""The denoising loop: samplers, classifier-free guidance, the control schedule, img2img, masks.

The loop owns no weights: it takes a base model and prepared control units. Per step it decides
which controls run (inside their step window, strength above 0), builds one batch of both CFG
halves, lets the conditional-only controls see only the conditional half, and steps a diffusers
scheduler. Everything that can be done once (prompt embeddings, hint features, the mask at latent
size) is done before the first step.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from ..choices import ControlMode, Sampler, TimestepSpacing
from ..families.sd.base import BaseModel, PromptEmbeddings
from ..families.sd.controlnet import ControlNet
from ..model.control import Control, control_scales, controlled_unet_forward
from ..model.fastpath import compile_modules, has_own_graphs, step_graphs, weights_key
from .check import check_spacing, check_steps

__all__ = [
    "ControlUnit",
    "DenoiseResult",
    "PreparedControl",
    "denoise",
    "initial_noise",
    "make_scheduler",
    "mask_to_latent",
    "step_generators",
    "steps_run",
]


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


@dataclass
class ControlUnit:
    """One ControlNet as the user sets it for a whole generation.

    condition: model input (1 or B, hint_channels, H, W) at the output size; RGB maps in [0, 1]
        (the inpaint convention marks masked pixels -1).
    start, end: the fraction of the denoising steps it runs in: step i of N runs it when
        start <= i / N < end.
    mode: balanced / prompt / controlnet; ``guess_mode`` is "controlnet is more important".
    region: (1, 1, H, W) weights in [0, 1] at the output size: where the control acts (None:
        everywhere).
    """

    controlnet: ControlNet
    condition: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlMode | str = ControlMode.BALANCED
    guess_mode: bool = False
    only_mid: bool = False
    region: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.mode = ControlMode.CONTROLNET if self.guess_mode else ControlMode.parse(self.mode)
        if self.strength < 0:
            raise ValueError(f"control strength must be >= 0, got {self.strength}")
        if not 0.0 <= self.start <= 1.0 or not 0.0 <= self.end <= 1.0:
            raise ValueError(f"control start/end must be fractions in [0, 1], got {self.start}, {self.end}")
        if self.start > self.end:
            raise ValueError(f"control start {self.start} is after its end {self.end}")
        if self.region is not None and (self.region.ndim != 4 or self.region.shape[:2] != (1, 1)):
            raise ValueError(f"a control region must be (1, 1, H, W), got {tuple(self.region.shape)}")

    @property
    def conditional_only(self) -> bool:
        """Runs on the conditional CFG half only: "ControlNet is more important", and the global
        pooling (shuffle) models, as released."""
        assert isinstance(self.mode, ControlMode)
        return self.mode.conditional_only or self.controlnet.config.global_pool

    def in_window(self, step: int, total: int) -> bool:
        return self.start <= step / total < self.end


@dataclass
class PreparedControl:
    """A unit with its hint features computed once, ready for every step."""

    unit: ControlUnit
    scales: list[float]
    hint_one_half: torch.Tensor  # batch of one CFG half (or 1)
    hint_both_halves: torch.Tensor  # batch of both halves (or 1)
    region: torch.Tensor | None = None  # at the hint's (the latent's) size

    @classmethod
    @torch.no_grad()
    def build(
        cls, unit: ControlUnit, batch: int, device: torch.device, dtype: torch.dtype
    ) -> PreparedControl:
        cond = unit.condition.to(device=device, dtype=dtype)
        if cond.shape[0] not in (1, batch):
            raise ValueError(
                f"control condition batch {cond.shape[0]} is neither 1 nor the sample count {batch}"
            )
        hint = unit.controlnet.encode_hint(cond)
        both = hint if hint.shape[0] == 1 else torch.cat([hint, hint])
        cn = unit.controlnet
        assert isinstance(unit.mode, ControlMode)
        scales = control_scales(cn.num_residuals, unit.strength, unit.mode, only_mid=unit.only_mid)
        region = None
        if unit.region is not None:
            region = F.interpolate(unit.region.float(), size=hint.shape[-2:], mode="area")
            region = region.to(device=device, dtype=dtype)
        return cls(unit, scales, hint, both, region)

    def at(self, step: int, total: int, cfg: bool) -> Control | None:
        """The control to apply at ``step`` of ``total``, or None when it must not run."""
        if self.unit.strength == 0 or not self.unit.in_window(step, total):
            return None
        cond_only = self.unit.conditional_only and cfg
        hint = self.hint_one_half if cond_only or not cfg else self.hint_both_halves
        return Control(self.unit.controlnet, hint, self.scales, cond_only, self.region)


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
    eta: float = 0.0,
    seeds: Sequence[int],
    latent_size: tuple[int, int],
    init_latents: torch.Tensor | None = None,
    denoise_strength: float = 1.0,
    mask: torch.Tensor | None = None,
    progress: bool = True,
    progress_label: str = "denoising",
    callback: Callable[[int, int], None] | None = None,
    cuda_graphs: bool | None = None,
    compile: bool = False,
    concurrent_controls: bool = True,
) -> DenoiseResult:
    """Sample latents.

    Args:
        cond / uncond: prompt embeddings of the B samples (uncond None: no classifier-free guidance).
        seeds: one per sample; sample i's noise (and its scheduler noise) come from seeds[i].
        latent_size: (h, w) of the latents.
        init_latents: img2img source latents (B or 1, C, h, w); ``denoise_strength`` in (0, 1] is
            the fraction of the schedule that is run (1 = start from pure noise).
        mask: (1 or B, 1, h, w) in [0, 1] at latent size; 1 = regenerate, 0 = keep the source.
            The kept region follows the source latents, noised to the current level, every step.
        progress / progress_label: a progress bar (steps, it/s, ETA) and its label.
        cuda_graphs: replay each step's model call from a CUDA graph (None: on CUDA devices).
        compile: also torch.compile the UNet and ControlNets (the fast path; slow first call).
        concurrent_controls: run several ControlNets of a step on parallel CUDA streams (no
            effect elsewhere, nor with networks compiled in reduce-overhead mode); the results are
            the same either way.
    """
    check_steps(sampler, steps)
    if not 0.0 < denoise_strength <= 1.0:
        raise ValueError(f"denoise strength must be in (0, 1], got {denoise_strength}")
    if mask is not None and init_latents is None:
        raise ValueError("a mask needs an init image (the source whose unmasked region is kept)")
    batch, device, dtype = len(seeds), base.device, base.dtype
    use_cfg = uncond is not None and guidance != 1.0
    scheduler = make_scheduler(sampler, base.schedule, timestep_spacing)
    scheduler.set_timesteps(steps, device=device)
    first = steps - steps_run(steps, denoise_strength) if init_latents is not None else 0
    timesteps = scheduler.timesteps[first * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * scheduler.order)
    total = len(timesteps)

    shape = (batch, base.unet.config.in_channels, *latent_size)
    noise = initial_noise(shape, seeds, device, torch.float32)
    step_kwargs = _step_kwargs(scheduler, eta, step_generators(seeds))
    source = None
    latents = noise * scheduler.init_noise_sigma
    if init_latents is not None:
        source = init_latents.to(device=device, dtype=torch.float32).expand(shape)
        if first > 0:  # img2img: start part-way, from the source noised to that level
            latents = scheduler.add_noise(source, noise, timesteps[:1])
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)

    prepared = [PreparedControl.build(u, batch, device, dtype) for u in controls]
    embeds = PromptEmbeddings.cat([uncond, cond]) if use_cfg else cond  # type: ignore[list-item]
    calls = {i: 0 for i in range(len(prepared))}
    networks = [base.unet, *(u.controlnet for u in controls)]
    if compile:
        compile_modules(networks)
    want_graphs = cuda_graphs if cuda_graphs is not None else device.type == "cuda"
    own_graphs = has_own_graphs(networks)
    graphs = step_graphs(base.unet, device) if want_graphs and not own_graphs else None
    # networks that replay inductor's CUDA graphs (compiled for training in reduce-overhead mode)
    # allocate from one memory pool that inductor fills from a single stream; side streams are
    # outside what it supports (a validation run during such training, with side streams, drew
    # NaN images), so they run one after the other
    concurrent = concurrent_controls and not own_graphs
    # what a step's graph depends on besides its inputs: weights, controls, guidance
    graph_key = (weights_key(networks) if graphs is not None else (), use_cfg, guidance, concurrent)
    per_generation = {"context": embeds.context, **{f"added.{k}": v for k, v in (embeds.added or {}).items()}}

    def model_call(active: list[Control]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """eps for the B samples: both CFG halves in one batch, the active controls injected.
        Everything that varies between generations is read from ``inputs``."""

        def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            x = torch.cat([inputs["x"], inputs["x"]]) if use_cfg else inputs["x"]
            added = {k[6:]: v for k, v in inputs.items() if k.startswith("added.")} or None
            eps = controlled_unet_forward(
                base.unet,
                x,
                inputs["t"],
                inputs["context"],
                [
                    replace(c, hint=inputs[f"hint{j}"], region=inputs.get(f"region{j}"))
                    for j, c in enumerate(active)
                ],
                cfg_batch=use_cfg,
                added_cond_kwargs=added,
                concurrent=concurrent,
            ).float()
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            return eps

        return fn

    start = time.perf_counter()
    bar = tqdm(total=total, desc=progress_label, unit="step", disable=not progress, leave=False)
    # the scheduler gets each timestep as a CPU tensor: DDIM looks its noise level up in a CPU
    # table by the timestep, which for a GPU tensor would wait for the GPU every step. The UNet
    # gets them as float32 (it embeds them so whatever their dtype): one dtype for every sampler's
    # timesteps lets them share graphs
    for i, (t, t_host) in enumerate(zip(timesteps.float(), timesteps.cpu())):
        active, key = [], []
        for k, p in enumerate(prepared):
            c = p.at(i, total, use_cfg)
            if c is not None:
                active.append(c)
                key.append((k, c.conditional_only, tuple(c.scales)))
                calls[k] += 1
        x = scheduler.scale_model_input(latents, t_host).to(dtype)
        inputs = {"x": x, "t": t, **per_generation}
        inputs.update({f"hint{j}": c.hint for j, c in enumerate(active)})
        inputs.update({f"region{j}": c.region for j, c in enumerate(active) if c.region is not None})
        fn = model_call(active)
        eps = graphs.run((graph_key, *key), fn, inputs) if graphs is not None else fn(inputs)
        latents = scheduler.step(eps, t_host, latents, **step_kwargs).prev_sample
        if mask is not None:
            assert source is not None
            kept = source if i == total - 1 else scheduler.add_noise(source, noise, timesteps[i + 1 : i + 2])
            latents = mask * latents + (1 - mask) * kept
        bar.update(1)
        if callback is not None:
            callback(i + 1, total)
    bar.close()
    return DenoiseResult(latents.to(dtype), total, time.perf_counter() - start, calls)


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
