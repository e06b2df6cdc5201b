"""The training loop: one readable loop for every objective, on one process or many (accelerate).

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` rows per process (the global
batch is their product with the process count), AdamW, optional gradient clipping and EMA, then
logging, validation and checkpoints on their schedules. The data order is a permutation drawn
from (seed, epoch) and every random draw comes from (seed, step, micro-step), so a resumed run
repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..choices import DType
from ..model.fastpath import check_compile_mode, compile_modules, has_own_graphs
from ..plots import line_plot
from .checkpoints import (
    EMA,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .objectives import Objective, StepNoise

__all__ = ["TrainConfig", "TrainResult", "train"]

Validator = Callable[[Objective, int, Path], dict[str, float]]
Exporter = Callable[[Objective, "dict[str, torch.Tensor] | None", Path], list[Path]]


@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is per process; the global batch is
    batch_size * processes * grad_accum."""

    out: str
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    decoder_lr: float = 2e-6
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to zero at the last step, after the warm-up)
    max_grad_norm: float | None = None
    #: the frozen parts' dtype, and autocast's (float32: full precision); bf16, fp16, no are read too
    mixed_precision: DType | str = DType.FLOAT32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the networks (a slow first step, faster later ones)
    compile_mode: str = "default"  # fastpath.COMPILE_MODES; "reduce-overhead" also graphs the steps
    ema_decay: float | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    validate_every: int = 500
    validation_count: int = 4
    score_name: str | None = None  # the validation metric whose first crossing of
    score_threshold: float | None = None  # the threshold is logged as "sudden convergence"
    log_every: int = 10
    num_workers: int = 0
    resume: bool = False
    save_checkpoints: bool = True  # off only for throughput measurements
    cpu: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # the objective's options, recorded with the run

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        for name in (
            "steps",
            "epochs",
            "batch_size",
            "grad_accum",
            "checkpoint_every",
            "validate_every",
            "log_every",
        ):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.lr <= 0 or self.decoder_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, decoder_lr={self.decoder_lr}")
        try:
            self.mixed_precision = DType.parse(self.mixed_precision)
        except ValueError:
            names = ", ".join(d.value for d in DType)
            raise ValueError(
                f"mixed_precision must be one of {names}, got {self.mixed_precision!r}"
            ) from None
        check_compile_mode(self.compile_mode, "compile_mode")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate's multiplier at ``step`` (0-based) of ``total``: a linear warm-up, then
    constant or a half cosine that reaches zero after the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup_steps) / span))
    return 1.0


@dataclass
class TrainResult:
    state: TrainState
    run_dir: Path
    seconds: float
    samples_per_second: float
    converged_at: int | None
    exported: list[Path]
    last_metrics: dict[str, float]


def _epoch_batches(
    indices: np.ndarray, seed: int, epoch: int, global_batch: int, rank: int, batch: int
) -> list[list[int]]:
    """This process's rows of each global batch of one epoch."""
    perm = indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]
    starts = range(0, len(perm) // global_batch * global_batch, global_batch)
    return [perm[b + rank * batch : b + (rank + 1) * batch].tolist() for b in starts]


class _RunBatches(Sampler[list[int]]):
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


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
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


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in batch.items()}


class _Metrics:
    """Append-only metrics: ``metrics.csv`` (step, name, value) and TensorBoard, from process 0."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.writer = None
        if not enabled:
            return
        rows: list[list[str]] = []
        if self.path.is_file():  # keep what the resumed checkpoint had seen, drop what came after it
            with open(self.path, newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "name", "value"])
            w.writerows(rows)
        for step, name, value in rows:
            self.history.setdefault(name, []).append((int(step), float(value)))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a dependency, but the CSV alone is enough to go on
            self.writer = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for name, value in values.items():
                w.writerow([step, name, f"{value:.8g}"])
                self.history.setdefault(name, []).append((step, value))
                if self.writer is not None:
                    self.writer.add_scalar(name, value, step)

    def plot(self, run_dir: Path, hlines: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        names = [n for n in self.history if n in ("loss", "val_loss")]
        if names:
            line_plot({n: tuple(zip(*self.history[n])) for n in names}, run_dir / "loss.png", title="loss")
        # fractions (IoU, accuracies) share an axis; distances such as Delta E stay in metrics.csv
        scores = [
            n for n in self.history if n.startswith("score/") and all(0 <= v <= 1 for _, v in self.history[n])
        ]
        if scores:
            line_plot(
                {n[6:]: tuple(zip(*self.history[n])) for n in scores},
                run_dir / "scores.png",
                title="validation scores",
                hlines=hlines,
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(
    cfg: TrainConfig,
    objective: Objective,
    dataset: Dataset,
    *,
    validator: Validator | None = None,
    exporter: Exporter | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train ``objective`` on ``dataset`` (items: dicts of tensors and prompts)."""
    cfg.validate()
    if accelerator is None:
        # accelerate keeps one precision per process: a later run in the same process (a notebook,
        # a sweep) with another precision starts from a fresh state (the distributed one is kept)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    precision = DType.parse(cfg.mixed_precision)
    accel = accelerator or Accelerator(mixed_precision=precision.accelerate, cpu=cfg.cpu)
    rank, world, device = accel.process_index, accel.num_processes, accel.device
    main = accel.is_main_process
    run_dir = Path(cfg.out)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    n_val = min(cfg.validation_count, max(0, len(dataset) - 1)) if validator is not None else 0
    train_idx = np.arange(len(dataset) - n_val)
    global_batch = cfg.batch_size * world
    batches_per_epoch = len(train_idx) // global_batch
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set has {len(train_idx)} items, fewer than one optimizer step's "
            f"{global_batch * cfg.grad_accum} (batch {cfg.batch_size} x {world} processes "
            f"x {cfg.grad_accum} accumulation)"
        )
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch  # type: ignore[operator]

    weight_dtype = precision.torch
    objective.prepare(device, weight_dtype)
    if cfg.gradient_checkpointing:
        objective.enable_gradient_checkpointing()
    if cfg.compile:
        compile_modules(objective.networks(), mode=cfg.compile_mode, training=True)
    graphed = has_own_graphs(objective.networks())
    groups = objective.param_groups(cfg.lr, cfg.decoder_lr)
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    named = {
        f"{m}.{n}": p
        for m, mod in objective.trainable_modules().items()
        for n, p in mod.named_parameters()
        if p.requires_grad
    }
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay else None

    state = TrainState()
    if cfg.resume and (ckpt_path := latest_checkpoint(run_dir)) is not None:
        ckpt = load_checkpoint(ckpt_path)
        objective.load_trainable_state(ckpt.trainable)
        _load_optimizer(optimizer, objective, ckpt.optimizer_state)
        if ema is not None:
            if ckpt.ema is None:
                raise ValueError(f"{ckpt_path}: this run uses EMA but the checkpoint has none")
            ema.load_state_dict(ckpt.ema)
        ckpt.restore_rng()
        state = ckpt.state
        if main:
            print(f"resuming from {ckpt_path} at step {state.step}")
    model, optimizer = accel.prepare(objective, optimizer)

    metrics = _Metrics(run_dir, main, state.step)
    run_info = _read_json(run_dir / "run.json") if cfg.resume else {}
    converged_at: int | None = run_info.get("converged_at")
    if main:
        _write_json(
            run_dir / "run.json",
            {
                **run_info,
                "config": asdict(cfg),
                "processes": world,
                "global_batch": global_batch * cfg.grad_accum,
            },
        )

    def batches() -> Iterator[dict[str, Any]]:
        sampler = _RunBatches(
            train_idx, cfg.seed, global_batch, rank, cfg.batch_size, state.epoch, state.batch_in_epoch
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_collate,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
        for b in loader:  # the loader works ahead; the state counts what the loop has taken
            state.batch_in_epoch += 1
            if state.batch_in_epoch == batches_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            yield _to(b, device)

    data = batches()
    bar = tqdm(
        total=total, initial=state.step, desc="training", unit="step", disable=not (main and cfg.progress)
    )
    started, start_step = time.perf_counter(), state.step
    mark, mark_step = started, state.step  # throughput is measured over each logging window
    window: list[torch.Tensor] = []
    last: dict[str, float] = {}
    while state.step < total:
        factor = lr_factor(cfg, state.step, total)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * factor
        for micro in range(cfg.grad_accum):
            batch = data.__next__()
            rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
            noise = StepNoise(cfg.seed, state.step, micro, global_batch, rows, device)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accel.no_sync(model)
            if graphed:  # a new step: inductor's graphs may reuse the last one's output buffers
                torch.compiler.cudagraph_mark_step_begin()
            with sync, accel.autocast():
                loss = model(batch, noise) / cfg.grad_accum
            accel.backward(loss)
            window.append(loss.detach() * cfg.grad_accum)
        if cfg.max_grad_norm is not None:
            accel.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        state.step += 1
        state.samples_seen += global_batch * cfg.grad_accum
        bar.update(1)

        if state.step % cfg.log_every == 0 or state.step == total:
            mean_loss = accel.reduce(torch.stack(window).mean(), reduction="mean").item()
            window.clear()
            now = time.perf_counter()
            sps = (state.step - mark_step) * global_batch * cfg.grad_accum / (now - mark)
            mark, mark_step = now, state.step
            last = {"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": sps}
            if device.type == "cuda":
                last["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics.log(state.step, last)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "lr"})

        if validator is not None and (state.step % cfg.validate_every == 0 or state.step == total):
            scores = validator(accel.unwrap_model(model), state.step, run_dir) if main else {}
            if main:
                metrics.log(state.step, scores)
                last.update(scores)
                name = f"score/{cfg.score_name}" if cfg.score_name else None
                if (
                    converged_at is None
                    and name in scores
                    and cfg.score_threshold is not None
                    and scores[name] >= cfg.score_threshold
                ):
                    converged_at = state.step
                    bar.write(
                        f"sudden convergence: {cfg.score_name} = {scores[name]:.3f} crossed "
                        f"{cfg.score_threshold} at step {state.step}"
                    )
                hl = (
                    {f"threshold {cfg.score_threshold}": cfg.score_threshold} if cfg.score_threshold else None
                )
                metrics.plot(run_dir, hl)
            accel.wait_for_everyone()

        if cfg.save_checkpoints and (state.step % cfg.checkpoint_every == 0 or state.step == total):
            if main:
                save_checkpoint(
                    run_dir,
                    state,
                    objective.trainable_state(),
                    _optimizer_state(optimizer, objective),
                    asdict(cfg),
                    ema,
                )
                prune_checkpoints(run_dir, cfg.keep_checkpoints)
                _write_json(
                    run_dir / "run.json", {**_read_json(run_dir / "run.json"), "converged_at": converged_at}
                )
            accel.wait_for_everyone()
    bar.close()
    seconds = time.perf_counter() - started
    sps = (state.step - start_step) * global_batch * cfg.grad_accum / seconds if seconds > 0 else math.nan
    exported: list[Path] = []
    if main and exporter is not None:
        exported = exporter(objective, ema.state_dict() if ema is not None else None, run_dir / "final")
    if main:
        metrics.plot(run_dir)
        metrics.close()
        info = {
            **_read_json(run_dir / "run.json"),
            "converged_at": converged_at,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "seconds_this_session": round(seconds, 2),
            "samples_per_s_this_session": sps,
            "last_metrics": last,
            "exported": [str(p.relative_to(run_dir)) for p in exported],
        }
        _write_json(run_dir / "run.json", info)
    accel.wait_for_everyone()
    return TrainResult(state, run_dir, seconds, sps, converged_at, exported, last)


def _param_names(optimizer: torch.optim.Optimizer, objective: Objective) -> list[list[str]]:
    names = {
        id(p): f"{m}.{n}"
        for m, mod in objective.trainable_modules().items()
        for n, p in mod.named_parameters()
    }
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _optimizer_state(optimizer: torch.optim.Optimizer, objective: Objective) -> dict[str, Any]:
    """Optimizer state keyed by parameter NAME (not position), so a checkpoint is checkable."""
    sd = optimizer.state_dict()
    names = _param_names(optimizer, objective)
    index_to_name = {
        i: n for g_sd, g_names in zip(sd["param_groups"], names) for i, n in zip(g_sd["params"], g_names)
    }
    return {
        "state": {index_to_name[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": gn} for g, gn in zip(sd["param_groups"], names)],
    }


def _load_optimizer(optimizer: torch.optim.Optimizer, objective: Objective, saved: dict[str, Any]) -> None:
    names = _param_names(optimizer, objective)
    saved_names = [g["params"] for g in saved["param_groups"]]
    if saved_names != names:
        raise ValueError("checkpoint optimizer does not match this run's trainable parameters")
    flat = {n: i for i, n in enumerate(n for g in names for n in g)}
    groups = [{**g, "params": [flat[n] for n in g["params"]]} for g in saved["param_groups"]]
    state = {flat[n]: v for n, v in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..imageio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1, default=str) + "\n").encode())
