"""Training with sharded weights: FSDP (version 2) through an accelerate config, as seen by the loop.

accelerate shards the prepared objective (the locked base's network and the ControlNet, each
transformer block a unit of its own) across the processes; every process then holds a slice of
each weight (a ``DTensor``) and of its optimizer state. The loop's own work on weights goes
through this module, so that it reads the same whether or not they are sharded:
    - :func:`gather` turns a dict of tensors (weights, optimizer state, EMA) into whole tensors on
      the main process, one tensor at a time (a collective: every process calls it);
    - :func:`assign` writes a whole tensor (from a checkpoint) into a weight, sharded or not;
    - :func:`all_finite` asks every process about its own slices;
    - :func:`whole_copies_in_place` gives the exporter unsharded copies of the trained modules
      (made before sharding: :func:`controlnet.model.empty.empty_copy`), and
      :func:`unsharded_root` lets every process run validation together.
Nothing here distributes anything itself: accelerate's FSDP2 plugin does the sharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "all_finite",
    "assign",
    "gather",
    "is_sharded",
    "like",
    "prepare_sharding",
    "unsharded_root",
    "whole_copies_in_place",
]


def is_sharded(accel: Accelerator) -> bool:
    """Whether accelerate shards the weights of this run (an FSDP config)."""
    return accel.distributed_type == DistributedType.FSDP


def prepare_sharding(accel: Accelerator, objective: nn.Module) -> None:
    """Before ``accel.prepare``: refuse what sharding cannot train, and keep the objective's own
    precision (frozen weights stored in the compute dtype, trained ones in float32 under autocast):
    FSDP's mixed-precision policy would cast the float32 master weights down for compute, so the
    same run would train differently sharded and not."""
    if not is_sharded(accel):
        return
    plugin = accel.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(its per-parameter sharding keeps each weight's name, which checkpoints need)"
        )
    if not getattr(objective, "shardable", True):
        raise ValueError(
            f"{type(objective).__name__} trains and exports a whole model (a VAE or a base from "
            "scratch): run it data parallel (an accelerate config without FSDP); sharding is for a "
            "ControlNet over a large locked base"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather(tensors: dict[str, Any], main: bool) -> dict[str, Any]:
    """``tensors`` with every tensor whole and on the host, on the main process (an empty dict on
    the others). Sharded tensors are gathered one at a time, so no process holds more than one
    whole tensor on its device at once; every process must call this together."""
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if isinstance(v, dict):  # (an optimizer's per-parameter state)
            inner = gather(v, main)
            if main:
                out[k] = inner
            continue
        whole = _whole(v) if torch.is_tensor(v) else v
        if main:
            out[k] = whole.detach().cpu().contiguous() if torch.is_tensor(whole) else whole
    return out


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor of ``param``'s shape, e.g. its Adam moments) sharded as
    ``param`` is: this process's slice (every process holds ``value`` whole, read from the same
    checkpoint: nothing is sent); other values (a step count) unchanged."""
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    return value


@torch.no_grad()
def assign(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the whole tensor ``src`` into ``dst``, sharded or not (a sharded one takes its slice)."""
    dst.copy_(like(dst, src))


def all_finite(accel: Accelerator, named: dict[str, torch.Tensor]) -> str | None:
    """The first of ``named`` that holds NaN or inf in any process's slice, or None (every process
    gets the same answer)."""
    local = [(t.to_local() if isinstance(t, DTensor) else t) for t in named.values()]
    bad = torch.stack([~torch.isfinite(t).all() for t in local]).float().to(accel.device)
    if is_sharded(accel):
        bad = accel.reduce(bad, reduction="sum")
    hits = torch.nonzero(bad).flatten().tolist()
    return list(named)[hits[0]] if hits else None


@contextlib.contextmanager
def whole_copies_in_place(
    root: nn.Module,
    live: dict[str, nn.Module],
    copies: dict[str, nn.Module],
    overrides: dict[str, torch.Tensor] | None,
    main: bool,
) -> Iterator[None]:
    """Inside, on the main process, each sharded module of ``live`` (by name) is replaced where it
    sits in ``root`` by its entry in ``copies`` (an empty copy made before sharding), filled on the
    host with the module's tensors gathered whole (every process takes part) and then
    ``overrides`` (keys ``name.tensor``, as the objective's trainable state names them: the EMA
    weights)."""
    whole = gather({f"{n}.{k}": v for n, m in live.items() for k, v in m.state_dict().items()}, main)
    if not main:
        yield
        return
    whole.update(overrides or {})
    places = {id(m): path for path, m in root.named_modules()}
    swaps = []
    for name, module in live.items():
        parent_path, _, attr = places[id(module)].rpartition(".")
        parent = root.get_submodule(parent_path)
        whole_copy = copies[name].to_empty(device="cpu")
        whole_copy.load_state_dict(
            {k[len(name) + 1 :]: v for k, v in whole.items() if k.startswith(f"{name}.")}
        )
        swaps.append((parent, attr, module))
        setattr(parent, attr, whole_copy)
    try:
        yield
    finally:
        for parent, attr, module in swaps:
            setattr(parent, attr, module)


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[None]:
    """Inside, the weights of ``model``'s root unit (what no block unit holds: embedders, final
    layers) are whole on every process, so that its networks can be called one by one (as
    sampling does) and not only through the root's forward; each block unit gathers and frees its
    own as it runs. Every process must enter together and then run the same calls."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
