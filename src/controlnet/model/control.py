"""Control residuals for any family: scales, control modes, regions, several ControlNets summed.

A ControlNet of any family is called as ``controlnet(sample, timestep, context, hint, added)`` and
returns one residual per output of its trainable copy; the family's base model adds residual i to
its own output i (:meth:`controlnet.families.protocol.BaseModel.predict`; for the UNets,
:mod:`controlnet.families.sd.forward`). Each ControlNet's residuals are multiplied by its own
per-residual scales; the residuals of several ControlNets are summed with no other weighting.

With classifier-free guidance the batch is ``[unconditional; conditional]``. Some controls run
on the conditional half only (guess mode / "ControlNet is more important", and the global-pooling
shuffle model); their unconditional residuals are zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import ControlMode
from .fastpath import run_concurrently

__all__ = [
    "SOFT_DECAY",
    "Control",
    "conditional_half",
    "control_modes",
    "control_residuals",
    "control_scales",
    "control_type_choices",
    "control_type_names",
    "region_at",
    "region_tokens",
    "residual_functions",
    "resolve_control_type",
    "scaled",
    "soft_scales",
    "sum_residuals",
    "zero_first_half",
]

#: Per-level decay of the "soft" (guess mode) scales: scale_i = s * 0.825 ** (n - 1 - i).
SOFT_DECAY = 0.825


def soft_scales(count: int, strength: float = 1.0) -> list[float]:
    """Guess-mode scales: strength * 0.825 ** (count - 1 - i); the middle residual (last) gets
    the full strength, the shallowest skip the least. For SD (count 13) this is the released
    ``s * 0.825 ** (12 - i)``."""
    return [strength * SOFT_DECAY ** float(count - 1 - i) for i in range(count)]


def control_scales(
    count: int,
    strength: float = 1.0,
    mode: ControlMode | str = ControlMode.BALANCED,
    *,
    only_mid: bool = False,
) -> list[float]:
    """One multiplier per residual for a ControlNet with ``count`` residuals (middle last).

    ``only_mid`` keeps only the middle residual (the original's ``only_mid_control``).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    mode = ControlMode.parse(mode)
    scales = soft_scales(count, strength) if mode.soft else [float(strength)] * count
    if only_mid:
        scales = [0.0] * (count - 1) + [scales[-1]]
    return scales


@dataclass
class Control:
    """One ControlNet applied at one denoising step.

    hint: the condition as the ControlNet reads it (the base's ``control_hint``), batch equal to
        the rows it runs on (the whole batch, or the conditional half when ``conditional_only``),
        or 1 (broadcast).
    scales: one multiplier per residual (see :func:`control_scales`).
    conditional_only: run on the conditional half of a CFG batch only.
    region: where the control acts, (1, 1, h, w) weights in [0, 1] over the latent (None:
        everywhere; the A1111 extension's "effective region mask"). Each residual is multiplied by
        it, averaged over the residual's cells (area resizing), so a control with several others
        can be kept to part of the image.
    control_type: a Union ControlNet's kind of condition (its mode index), or None.
    """

    controlnet: nn.Module
    hint: torch.Tensor
    scales: Sequence[float]
    conditional_only: bool = False
    region: torch.Tensor | None = None
    control_type: int | None = None

    def __post_init__(self) -> None:
        if len(self.scales) != self.controlnet.num_residuals:
            raise ValueError(
                f"got {len(self.scales)} control scales for a ControlNet with "
                f"{self.controlnet.num_residuals} residuals"
            )

    @property
    def active(self) -> bool:
        return any(s != 0 for s in self.scales)


def _half(x: Any, half: int) -> Any:
    if torch.is_tensor(x) and x.ndim > 0 and x.shape[0] == 2 * half:
        return x[half:]
    return x


def conditional_half(
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    context: torch.Tensor,
    added: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, Any, torch.Tensor, dict[str, torch.Tensor] | None]:
    """The conditional half of a ``[unconditional; conditional]`` batch's inputs."""
    half = sample.shape[0] // 2
    rest = {k: _half(v, half) for k, v in (added or {}).items()} or None
    return sample[half:], _half(timestep, half), context[half:], rest


def zero_first_half(res: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Residuals of the conditional half, with zeros for the unconditional one."""
    return [torch.cat([torch.zeros_like(r), r]) for r in res]


def scaled(c: Control, res: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``c``'s residuals times its per-residual scales, within its region, in ``dtype``."""
    out = [(r if s == 1.0 else r * s).to(dtype) for r, s in zip(res, c.scales)]
    return out if c.region is None else [r * region_at(c.region, r) for r in out]


def residual_functions(
    controls: Sequence[Control],
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    cfg_batch: bool,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None,
) -> list[Callable[[], list[torch.Tensor]]]:
    """One function per active control returning its scaled residuals (strength 0: not run)."""

    def run(c: Control) -> list[torch.Tensor]:
        if c.conditional_only and cfg_batch:
            x, t, ctx, added = conditional_half(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            res = zero_first_half(c.controlnet(x, t, ctx, c.hint, added))
        else:
            res = c.controlnet(sample, timestep, encoder_hidden_states, c.hint, added_cond_kwargs)
        return scaled(c, res, sample.dtype)

    return [partial(run, c) for c in controls if c.active]


def control_modes(controlnet: nn.Module) -> int | None:
    """How many kinds of condition a Union ControlNet knows (its modes); None for one kind."""
    modes = getattr(controlnet, "num_mode", None)
    if modes is None:
        modes = getattr(getattr(controlnet, "config", None), "num_mode", None)
    return modes


def control_type_names(controlnet: nn.Module) -> dict[int, tuple[str, ...]]:
    """A Union ControlNet's names for its modes, as its publishers name them: mode -> names (the
    first is the one shown, the others aliases). Empty where the model's modes have no names
    (numbers only) or it is not a Union ControlNet."""
    return dict(getattr(controlnet, "mode_names", None) or {})


def control_type_choices(controlnet: nn.Module) -> list[str] | None:
    """The control types a user may choose for ``controlnet``: each mode's shown name, or its
    number where it has none. None for a ControlNet of one kind."""
    modes = control_modes(controlnet)
    if modes is None:
        return None
    names = control_type_names(controlnet)
    return [names[m][0] if m in names else str(m) for m in range(modes)]


def _spelling(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def resolve_control_type(value: int | str | None, controlnet: nn.Module, where: str) -> int | None:
    """The mode number that ``value`` (a name the model knows, or a mode number, as a number or
    text) means for ``controlnet``; None for a ControlNet of one kind given none. ValueError
    naming ``where`` for a Union ControlNet given none, a type it does not know, or a type given
    to a ControlNet of one kind."""
    modes = control_modes(controlnet)
    if modes is None:
        if value is not None:
            raise ValueError(f"{where}: {value!r} given, but its ControlNet is not a Union ControlNet")
        return None
    names = control_type_names(controlnet)
    shown = ", ".join(names[m][0] for m in sorted(names))
    numbers = f"0-{modes - 1}"
    if value is None:
        expected = f"one of: {shown}; or {numbers}" if names else numbers
        raise ValueError(f"{where}: its Union ControlNet needs one ({expected})")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value < modes:
            named = f" ({shown})" if names else ""
            raise ValueError(f"{where}: {value}, but its Union ControlNet knows {numbers}{named}")
        return value
    by_name = {_spelling(n): m for m, ns in names.items() for n in ns}
    if _spelling(value) not in by_name:
        expected = f"one of: {shown} (or a mode number {numbers})" if names else f"a mode number {numbers}"
        raise ValueError(f"{where}: {value!r} is not a kind its Union ControlNet knows; expected {expected}")
    return by_name[_spelling(value)]


def region_tokens(region: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``region`` (1, 1, h, w) averaged over the cells of a token grid (rows, columns), as a
    (1, rows * columns, 1) weight for token-shaped residuals (a transformer's blocks)."""
    cells = F.interpolate(region.float(), size=grid, mode="area")
    return cells.flatten(2).transpose(1, 2).to(dtype)


def region_at(region: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``region`` averaged over the cells of ``residual``'s grid, in its dtype."""
    if region.shape[-2:] != residual.shape[-2:]:
        region = F.interpolate(region.float(), size=residual.shape[-2:], mode="area")
    return region.to(residual.dtype)


def sum_residuals(each: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
    total = each[0]
    for res in each[1:]:
        total = [a + b for a, b in zip(total, res)]
    return total


def control_residuals(
    controls: Sequence[Control],
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    *,
    cfg_batch: bool = False,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    concurrent: bool = False,
) -> list[torch.Tensor] | None:
    """Scaled, summed residuals of every active control, or None when none is active.

    ``cfg_batch`` says the batch is ``[unconditional; conditional]`` halves, so that controls with
    ``conditional_only`` run on the second half only (zero residuals on the first).
    ``concurrent`` runs several ControlNets on parallel CUDA streams (same results).
    """
    fns = residual_functions(controls, sample, timestep, encoder_hidden_states, cfg_batch, added_cond_kwargs)
    if not fns:
        return None
    return sum_residuals(run_concurrently(fns, sample.device) if concurrent else [fn() for fn in fns])
