"""Where a model's networks live while it generates, when GPU memory is short (``--offload``).

The parts that run once per generation (text encoders, VAE) live in CPU memory, pinned, and visit
the card only while they run: a visit copies their weights in and, afterwards, drops the copies
(the weights did not change, so nothing is copied back). The parts that run every step (the
transformer or UNet, the ControlNets) stay on the card - unless a visitor would not fit beside
them: then they step off to CPU memory for the visit and come back after it. So the card holds the
larger of "the denoising networks" and "the largest visitor", not their sum (Flux.1-dev with its
T5-XXL on a 24 GB card); on a CUDA card they step off into page-locked buffers kept for their next
step-off, so each trip moves at the bus's full speed instead of through freshly allocated pageable
memory. Whether a visitor fits is judged by its weights and a margin; a VAE decoding a large image
needs more (its activations), so a visit that runs out of card memory with the residents beside it
runs once more with them stepped off (:func:`visit`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["MARGIN", "Residence", "fits_beside", "move", "nbytes", "pin", "visit", "visiting"]

T = TypeVar("T")

#: what a visit may allocate besides the visitor's weights (activations, workspace), in bytes
MARGIN = 2 * 2**30


def move(module: nn.Module, device: Any = None, dtype: torch.dtype | None = None) -> nn.Module:
    """``module.to(device, dtype)`` as torch does it. diffusers' own ``to`` only adds checks for
    quantized and group-offloaded models (neither is used here) and, in 0.42, a warning on every
    ``dtype`` argument - even ``None`` - that a user would read on each generation."""
    return nn.Module.to(module, device=device, dtype=dtype)


def nbytes(modules: Iterable[nn.Module]) -> int:
    """The bytes of the modules' parameters and buffers."""
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def fits_beside(need: int, free: int, cached: int, margin: int = MARGIN) -> bool:
    """Whether ``need`` bytes (and ``margin``) fit in what the card has free plus what the
    allocator holds unused (``cached``)."""
    return need + margin <= free + cached


def _room_for(need: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # CPU memory: the operating system's to manage
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return fits_beside(need, free, cached)


def _tensors(module: nn.Module) -> Iterator[tuple[dict[str, torch.Tensor | None], str]]:
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    yield table, name


def pin(module: nn.Module) -> None:
    """Put a CPU module's tensors in page-locked memory (copies to a GPU go at full speed and
    asynchronously); nothing to do without CUDA."""
    if not torch.cuda.is_available():
        return
    for table, name in _tensors(module):
        t = table[name]
        if t.device.type == "cpu" and not t.is_pinned():
            pinned = t.data.pin_memory()
            if isinstance(t, nn.Parameter):
                t.data = pinned
            else:
                table[name] = pinned


@contextlib.contextmanager
def _copied_in(module: nn.Module, device: torch.device) -> Iterator[None]:
    """``module``'s tensors copied to ``device`` within the block; afterwards the copies are
    dropped and its own tensors are back (its weights are read, not changed, in the block)."""
    own: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []  # table, name, object, its data
    try:
        for table, name in _tensors(module):
            t = table[name]
            own.append((table, name, t, t.data))
            moved = t.data.to(device, non_blocking=True)
            if not isinstance(t, nn.Parameter):
                table[name] = moved
            elif torch._has_compatible_shallow_copy_type(t, moved):  # as Module.to does
                t.data = moved
            else:
                table[name] = nn.Parameter(moved, requires_grad=t.requires_grad)
        yield
    finally:
        for table, name, t, data in own:
            table[name] = t
            if isinstance(t, nn.Parameter):
                t.data = data


@contextlib.contextmanager
def _stepped_off(module: nn.Module, card: torch.device) -> Iterator[None]:
    """``module`` (on ``card``) in CPU memory within the block, back on ``card`` after it. On a
    CUDA card its tensors go to page-locked buffers kept on the module and reused by its next
    step-off (allocating and pinning gigabytes costs more than copying them); the same objects
    (its parameters) get new data, as ``Module.to`` does."""
    if card.type != "cuda":
        module.to("cpu")
        try:
            yield
        finally:
            module.to(card)
        return
    kept: dict[tuple[int, str], torch.Tensor] = module.__dict__.get("_step_off_buffers", {})
    # this step-off's buffers only: those of tensors since replaced (FP8 conversion) are let go
    module.__dict__["_step_off_buffers"] = used = {}
    off: list[tuple[dict, str, torch.Tensor]] = []  # table, name, the CPU copy
    seen: set[int] = set()  # (a tensor shared by two submodules moves once)
    try:
        for table, name in _tensors(module):
            t = table[name]
            if id(t) in seen:
                continue
            seen.add(id(t))
            host = kept.get((id(table), name))
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                host = torch.empty_like(t, device="cpu", pin_memory=True)
            used[(id(table), name)] = host
            host.copy_(t.data, non_blocking=True)  # the card's memory is reused in stream order
            t.data = host
            off.append((table, name, host))
        yield
    finally:
        for table, name, host in off:
            table[name].data = host.to(card, non_blocking=True)


@contextlib.contextmanager
def visiting(
    visitors: Sequence[nn.Module],
    residents: Sequence[nn.Module],
    card: torch.device,
    *,
    crowded: bool = False,
) -> Iterator[list[nn.Module]]:
    """Within the block the ``visitors`` that live elsewhere are on ``card``; if they would not fit
    beside the ``residents`` (the networks that live on the card), or ``crowded`` says so, those
    step off to CPU memory for the block and come back after it. Gives the residents that stepped
    off."""
    away = [m for m in visitors if next(m.parameters()).device != card]
    if not away:
        yield []
        return
    crowded = crowded or not _room_for(nbytes(away), card)
    stepping_off = [m for m in residents if crowded and next(m.parameters()).device == card]
    with contextlib.ExitStack() as stack:
        for m in stepping_off:
            stack.enter_context(_stepped_off(m, card))
        if stepping_off:
            torch.cuda.empty_cache()  # the room they left, for the visitors
        for m in away:
            stack.enter_context(_copied_in(m, card))
        yield stepping_off


def visit(
    visitors: Sequence[nn.Module], residents: Sequence[nn.Module], card: torch.device, fn: Callable[[], T]
) -> T:
    """``fn()`` with the ``visitors`` on the card (:func:`visiting`). The room a visit is given
    counts its weights and :data:`MARGIN`, not all that it allocates while it runs (a VAE decoding
    a large image holds gigabytes of activations): a visit that runs out of card memory while
    residents stayed beside it runs once more with them stepped off."""
    away = any(next(m.parameters()).device != card for m in visitors)
    stayed = False
    try:
        with visiting(visitors, residents, card) as off:
            stayed = not off and any(next(m.parameters()).device == card for m in residents)
            return fn()
    except torch.OutOfMemoryError:
        if not (away and stayed):  # nothing left to make room with
            raise
    # outside the handler: the failed attempt's tensors, held by its traceback, are free now
    if card.type == "cuda":
        torch.cuda.empty_cache()
    with visiting(visitors, residents, card, crowded=True):
        return fn()


class Residence:
    """Placement a base model's families share (mixed into each base class): the ControlNets that
    live beside its denoising network (``companions`` of its ``to``) and visits of its offloaded
    parts. A base names its denoising network (``denoiser``), its parts (``modules()``) and where
    that network is (``resident_device()``)."""

    denoiser: nn.Module
    modules: Callable[[], dict[str, nn.Module]]

    def resident_device(self) -> torch.device:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """The card the model runs on (also while its denoising network stepped off for a visit)."""
        return self.__dict__.get("_card") or self.resident_device()

    def keep_company(self, companions: Sequence[nn.Module], device: Any, dtype: torch.dtype | None) -> None:
        """Move ``companions`` (the ControlNets of a generation) beside the denoising network; they
        step off the card with it when a visitor needs the room. Held weakly: a ControlNet dropped
        elsewhere is not kept alive by the base."""
        for m in companions:
            move(m, device, dtype).eval()
        self.__dict__["_companions"] = [weakref.ref(m) for m in companions]

    @contextlib.contextmanager
    def visiting(self, *names: str) -> Iterator[None]:
        """Within the block the named parts (keys of :meth:`modules`; names the model lacks are
        skipped) are on the model's device; offloaded ones return to CPU memory afterwards."""
        with self._visit_of(names) as (visitors, residents, card), visiting(visitors, residents, card):
            yield

    def visit(self, name: str, fn: Callable[[], T]) -> T:
        """``fn()`` with the part ``name`` on the model's device, as :meth:`visiting` - for a part
        whose run may need more room than its weights (a VAE's decode, :func:`visit`)."""
        with self._visit_of((name,)) as (visitors, residents, card):
            return visit(visitors, residents, card, fn)

    @contextlib.contextmanager
    def _visit_of(
        self, names: Sequence[str]
    ) -> Iterator[tuple[list[nn.Module], list[nn.Module], torch.device]]:
        """The named parts, the residents and the card of a visit; within, the model's ``device``
        stays the card while its denoising network may have stepped off it."""
        mods = self.modules()
        companions = [r() for r in self.__dict__.get("_companions", [])]
        residents = [self.denoiser, *(m for m in companions if m is not None)]
        card, before = self.device, self.__dict__.get("_card")
        self.__dict__["_card"] = card
        try:
            yield [mods[n] for n in names if n in mods], residents, card
        finally:
            self.__dict__["_card"] = before
