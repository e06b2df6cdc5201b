"""The model callable the sampling loop calls, and its wrappers (k-diffusion's shape).

The loop (:func:`controlnet.generation.sampling.sample`) knows one thing about the model: called
as ``model(x, t, step)`` it returns the noise prediction for latents ``x`` at timestep ``t``, step
``step`` of the schedule. Everything else is a callable wrapped around another:

- :class:`ControlledDenoiser`: the locked base model with the controls of this step injected (which
  controls act is decided per step: their window, their strength); several ControlNets run on
  concurrent CUDA streams beside the base's encoder when asked;
- :class:`Guided`: classifier-free guidance, both halves in one batch;
- :class:`Graphed`: each distinct step replayed from a CUDA graph.

Each splits a call in two: :meth:`StepModel.plan` decides on the host what the step depends on (a
hashable key: the active controls and their scales) and which tensors vary (``inputs``), and
:meth:`StepModel.forward` computes from those tensors alone. That split is what lets a graph
capture a step once and replay it with new inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import ControlMode
from ..families.protocol import BaseModel, Inpaint, PromptEmbeddings
from ..model.control import Control, control_scales
from ..model.fastpath import GraphCache

__all__ = ["ControlUnit", "ControlledDenoiser", "Graphed", "Guided", "PreparedControl", "StepModel"]

Inputs = dict[str, torch.Tensor]


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
    inpaint: the request's image to edit and its mask, for a ControlNet that reads them beside
        its condition (the base's ``control_hint`` decides; None: not an edit).
    """

    controlnet: nn.Module  # a ControlNet of the base's family
    condition: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlMode | str = ControlMode.BALANCED
    guess_mode: bool = False
    only_mid: bool = False
    region: torch.Tensor | None = None
    control_type: int | None = None  # a Union ControlNet's kind of condition
    inpaint: Inpaint | None = None

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
        return self.mode.conditional_only or bool(getattr(self.controlnet.config, "global_pool", False))

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
        cls, unit: ControlUnit, batch: int, device: torch.device, dtype: torch.dtype, base: BaseModel
    ) -> PreparedControl:
        cond = unit.condition.to(device=device, dtype=dtype)
        if cond.shape[0] not in (1, batch):
            raise ValueError(
                f"control condition batch {cond.shape[0]} is neither 1 nor the sample count {batch}"
            )
        inpaint = unit.inpaint
        if inpaint is not None:
            inpaint = Inpaint(*(t.to(device=device, dtype=dtype) for t in (inpaint.image, inpaint.mask)))
        hint = base.control_hint(unit.controlnet, cond, inpaint=inpaint)
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
        return Control(
            self.unit.controlnet, hint, self.scales, cond_only, self.region, self.unit.control_type
        )


class StepModel:
    """A model callable of the sampling loop: ``model(x, t, step) -> eps``, computed as
    ``forward(inputs, key)`` from what ``plan(step)`` says the step needs."""

    def plan(self, step: int) -> tuple[Hashable, Inputs]:
        """(what the step's computation depends on besides its inputs, the inputs that vary)."""
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, torch.Tensor], key: Hashable) -> torch.Tensor:
        """The noise prediction from ``inputs`` ("x", "t" and what :meth:`plan` gave)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        key, inputs = self.plan(step)
        return self.forward({"x": x, "t": t, **inputs}, key)


class ControlledDenoiser(StepModel):
    """The base model's noise prediction with the controls of each step injected.

    embeds: the prompt embeddings of the batch the loop passes (with ``cfg_batch``: both CFG
    halves, unconditional first, for the doubled ``x`` that :class:`Guided` passes).
    total: the steps of the schedule (a control's window is a fraction of them).
    concurrent: run several ControlNets on parallel CUDA streams beside the base's encoder (the
    same operations, so the same results).
    """

    def __init__(
        self,
        base: BaseModel,
        controls: Sequence[PreparedControl],
        embeds: PromptEmbeddings,
        total: int,
        *,
        cfg_batch: bool,
        concurrent: bool = False,
    ) -> None:
        self.base, self.controls, self.total = base, list(controls), total
        self.cfg_batch, self.concurrent = cfg_batch, concurrent
        self.constants: Inputs = {
            "context": embeds.context,
            **{f"added.{k}": v for k, v in (embeds.added or {}).items()},
        }
        self.calls = {i: 0 for i in range(len(self.controls))}  # control -> steps it ran

    def plan(self, step: int) -> tuple[Hashable, Inputs]:
        inputs, key, active = dict(self.constants), [], []
        for k, p in enumerate(self.controls):
            c = p.at(step, self.total, self.cfg_batch)
            if c is not None:
                j = len(active)
                active.append(c)
                key.append((k, c.conditional_only, tuple(c.scales), c.control_type))
                inputs[f"hint{j}"] = c.hint
                if c.region is not None:
                    inputs[f"region{j}"] = c.region
                self.calls[k] += 1
        return tuple(key), inputs

    def forward(self, inputs: Mapping[str, torch.Tensor], key: Hashable) -> torch.Tensor:
        controls = [  # the key names each active control: which, its half, its scales
            Control(
                self.controls[k].unit.controlnet,
                inputs[f"hint{j}"],
                scales,
                only,
                inputs.get(f"region{j}"),
                kind,
            )
            for j, (k, only, scales, kind) in enumerate(key)  # type: ignore[misc, arg-type]
        ]
        added = {k[6:]: v for k, v in inputs.items() if k.startswith("added.")} or None
        return self.base.predict(
            inputs["x"],
            inputs["t"],
            inputs["context"],
            controls,
            added=added,
            cfg_batch=self.cfg_batch,
            concurrent=self.concurrent,
        ).float()


class Guided(StepModel):
    """Classifier-free guidance around ``model``: both halves in one batch (``x`` doubled), the
    prediction moved ``guidance`` times the way the prompt pulls it from the unconditional one
    (or as ``combine(uncond, cond, guidance)``, a family's own rule, says).

    guided: per step, whether it is guided; a step that is not runs ``alone`` (the same model on
    the conditional half only). renorm: when > 0, each sample's guided prediction is scaled down
    where its norm passes ``renorm`` times the conditional prediction's.
    """

    def __init__(
        self,
        model: StepModel,
        guidance: float,
        combine: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
        *,
        alone: StepModel | None = None,
        guided: Sequence[bool] | None = None,
        renorm: float = 0.0,
    ) -> None:
        self.model, self.guidance, self.combine = model, guidance, combine
        self.alone, self.guided, self.renorm = alone, guided, renorm

    def plan(self, step: int) -> tuple[Hashable, Inputs]:
        if self.alone is not None and self.guided is not None and not self.guided[step]:
            key, inputs = self.alone.plan(step)
            return ("alone", key), inputs
        key, inputs = self.model.plan(step)
        return ("guided", key), inputs

    def forward(self, inputs: Mapping[str, torch.Tensor], key: Hashable) -> torch.Tensor:
        how, key = key  # type: ignore[misc]
        if how == "alone":
            return self.alone.forward(inputs, key)  # type: ignore[union-attr]
        x2 = torch.cat([inputs["x"], inputs["x"]])
        eps_u, eps_c = self.model.forward({**inputs, "x": x2}, key).chunk(2)
        if self.combine is not None:
            out = self.combine(eps_u, eps_c, self.guidance)
        else:
            out = eps_u + self.guidance * (eps_c - eps_u)
        if self.renorm > 0:
            cap = self.renorm * eps_c.flatten(1).norm(dim=1) / out.flatten(1).norm(dim=1).clamp(min=1e-12)
            out = out * cap.clamp(max=1.0).view(-1, *[1] * (out.dim() - 1))
        return out


class Graphed(StepModel):
    """Each distinct step of ``model`` (by its key and input shapes) captured once as a CUDA graph
    and replayed (:class:`~controlnet.model.fastpath.GraphCache`); ``key`` names what the model's
    computation depends on beyond its inputs and plan (its weights, guidance), so that graphs kept
    from earlier generations are replayed only when they compute the same thing."""

    def __init__(self, model: StepModel, graphs: GraphCache, key: Hashable) -> None:
        self.model, self.graphs, self.key = model, graphs, key

    def plan(self, step: int) -> tuple[Hashable, Inputs]:
        return self.model.plan(step)

    def forward(self, inputs: Mapping[str, torch.Tensor], key: Hashable) -> torch.Tensor:
        def fn(static: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.model.forward(static, key)

        return self.graphs.run((self.key, key), fn, dict(inputs))
