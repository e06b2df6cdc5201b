"""The data a training run takes, in the order a resumed run repeats: a permutation per epoch from
(seed, epoch), each process taking its rows of every global batch, one loader for the whole run."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoints import TrainState

__all__ = ["RunBatches", "collate", "run_batches", "to_device"]


def _epoch_batches(
    indices: np.ndarray, seed: int, epoch: int, global_batch: int, rank: int, batch: int
) -> list[list[int]]:
    """This process's rows of each global batch of one epoch."""
    perm = indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]
    starts = range(0, len(perm) // global_batch * global_batch, global_batch)
    return [perm[b + rank * batch : b + (rank + 1) * batch].tolist() for b in starts]


class RunBatches(Sampler[list[int]]):
    """Epoch after epoch of batches from (``epoch``, ``start``) on, without end: one data loader
    serves the whole run, so its worker processes start once, not every epoch (on a small data
    set an epoch is a few steps)."""

    def __init__(
        self, indices: np.ndarray, seed: int, global_batch: int, rank: int, batch: int, epoch: int, start: int
    ):
        self.args = (indices, seed, global_batch, rank, batch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        indices, seed, global_batch, rank, batch = self.args
        for epoch in itertools.count(self.epoch):
            batches = _epoch_batches(indices, seed, epoch, global_batch, rank, batch)
            yield from batches[self.start if epoch == self.epoch else 0 :]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if torch.is_tensor(vals[0]):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], dict):
            out[k] = {kk: torch.stack([v[kk] for v in vals]) for kk in vals[0]}
        else:
            out[k] = vals
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in batch.items()}


def _leave_signals_to_the_run(worker_id: int) -> None:
    """Each loader worker leaves the run's process group: a Ctrl-C or a scheduler's SIGTERM to the
    group is the training loop's to handle (it stops after the step, with a checkpoint); a worker
    killed by it would take the run down first. The loader still ends its workers itself, and
    they end with the run."""
    os.setpgrp()


def run_batches(
    dataset: Dataset,
    state: TrainState,
    indices: np.ndarray,
    *,
    seed: int,
    global_batch: int,
    rank: int,
    batch: int,
    batches_per_epoch: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    """This process's batches from where ``state`` stands, on ``device``; ``state`` counts what
    has been taken (the loader works ahead), so a checkpoint knows where to resume."""
    sampler = RunBatches(indices, seed, global_batch, rank, batch, state.epoch, state.batch_in_epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        worker_init_fn=_leave_signals_to_the_run,
        pin_memory=device.type == "cuda",
    )
    for b in loader:
        state.batch_in_epoch += 1
        if state.batch_in_epoch == batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        yield to_device(b, device)
