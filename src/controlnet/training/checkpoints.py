"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder ``checkpoint-00001234/`` holding
    trainable.safetensors   the trained modules' weights (keys prefixed by module name)
    optimizer.safetensors   every optimizer state tensor, keyed by parameter name
    ema.safetensors         the EMA weights, when EMA is on
    state.json              step, data position, config, optimizer hyper-parameters, RNG states
It is written under a temporary name and renamed when complete, and an old one is renamed out of
sight before it is deleted, so a run killed at any point leaves every listed checkpoint whole;
``latest`` (a one-line file, replaced atomically) names the newest complete one.
No pickle is written or read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..formats.checkpoint import save_safetensors
from ..imageio import atomic_write_bytes
from .sharding import assign, like

__all__ = [
    "EMA",
    "TrainState",
    "latest_checkpoint",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "prune_checkpoints",
    "run_files",
    "save_checkpoint",
]

_PREFIX = "checkpoint-"


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, epoch, and batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0


class EMA:
    """Exponential moving average of parameters, kept in float32: ema = d * ema + (1 - d) * p."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if sd.keys() != self.shadow.keys():
            raise ValueError(
                f"EMA checkpoint keys differ: missing {sorted(self.shadow.keys() - sd.keys())[:5]}, "
                f"unexpected {sorted(sd.keys() - self.shadow.keys())[:5]}"
            )
        for k, v in sd.items():
            assign(self.shadow[k], v)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": repr(random.getstate()),
        "numpy": [str(x) if isinstance(x, str) else x for x in _np_state()],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _np_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _split_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state keyed by parameter name -> (tensors for safetensors, the rest for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, entries in osd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pname}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(pname, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        pname, field = key.rsplit("::", 1)
        state.setdefault(pname, {})[field] = t
    for pname, entries in meta["scalars"].items():
        state.setdefault(pname, {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    config: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    ema_decay: float | None = None,
) -> Path:
    """Write checkpoint ``step`` of a run atomically (``ema``: the EMA weights, whole); return its
    folder."""
    run_dir = Path(run_dir)
    final = run_dir / f"{_PREFIX}{state.step:08d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_safetensors(trainable, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _split_optimizer_state(optimizer_state)
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        if ema is not None:
            save_safetensors(ema, tmp / "ema.safetensors")
        meta = {
            "train_state": state.__dict__,
            "config": config,
            "optimizer": opt_meta,
            "rng": _rng_state(),
            "ema_decay": ema_decay if ema is not None else None,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # (saved again at this step): out of sight first, then gone
            _remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(run_dir / "latest", f"{final.name}\n".encode())
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    found = sorted(p for p in run_dir.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


@dataclass
class Checkpoint:
    path: Path
    state: TrainState
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    config: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    rng: dict[str, Any]

    def restore_rng(self) -> None:
        _set_rng_state(self.rng)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder; a missing or unreadable part is an error naming the file."""
    path = Path(path)
    need = ["state.json", "trainable.safetensors", "optimizer.safetensors"]
    for name in need:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint ({name} is missing)")
    try:
        meta = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt = _join_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
        ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    except (json.JSONDecodeError, KeyError, OSError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{path}: corrupt checkpoint ({e})") from None
    return Checkpoint(
        path, TrainState(**meta["train_state"]), trainable, opt, meta["config"], ema, meta["rng"]
    )


#: what a training run writes in its folder (and what starting it afresh removes)
RUN_FILES = ("run.json", "metrics.csv", "latest", "loss.png", "scores.png", "tensorboard", "samples", "final")


def run_files(run_dir: str | Path) -> list[Path]:
    """The files and folders of a training run in ``run_dir`` (none: no run was started there)."""
    run_dir = Path(run_dir)
    named = [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
    hidden = sorted(run_dir.glob(f".{_PREFIX}*.tmp-*")) + sorted(run_dir.glob(f".{_PREFIX}*.old-*"))
    return named + sorted(run_dir.glob(f"{_PREFIX}*")) + hidden


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale temporary folders)."""
    run_dir = Path(run_dir)
    done = sorted(p for p in run_dir.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    for old in done[: max(0, len(done) - keep)]:
        _remove(old)
    for stale in [*run_dir.glob(f".{_PREFIX}*.tmp-*"), *run_dir.glob(f".{_PREFIX}*.old-*")]:
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder so that a kill at any point leaves it either listed and whole or
    not listed at all: renamed out of the listing (atomic), then deleted."""
    gone = checkpoint.with_name(f".{checkpoint.name}.old-{os.getpid()}")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(checkpoint, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _param_names(optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module]) -> list[list[str]]:
    names = {id(p): f"{m}.{n}" for m, mod in modules.items() for n, p in mod.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def optimizer_state(optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """The optimizer's state keyed by parameter NAME (``module.param`` of the trained ``modules``),
    not position, so a checkpoint is checkable."""
    sd = optimizer.state_dict()
    names = _param_names(optimizer, modules)
    index_to_name = {
        i: n for g_sd, g_names in zip(sd["param_groups"], names) for i, n in zip(g_sd["params"], g_names)
    }
    return {
        "state": {index_to_name[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": gn} for g, gn in zip(sd["param_groups"], names)],
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module], saved: dict[str, Any]
) -> None:
    """Load an :func:`optimizer_state` (whole tensors) into ``optimizer``, refused when its
    parameters differ; the state of a sharded parameter is sharded as the parameter is."""
    names = _param_names(optimizer, modules)
    saved_names = [g["params"] for g in saved["param_groups"]]
    if saved_names != names:
        raise ValueError("checkpoint optimizer does not match this run's trainable parameters")
    flat = {n: i for i, n in enumerate(n for g in names for n in g)}
    groups = [{**g, "params": [flat[n] for n in g["params"]]} for g in saved["param_groups"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {
        flat[n]: {f: like(params[flat[n]], t) if torch.is_tensor(t) else t for f, t in v.items()}
        for n, v in saved["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": groups})
