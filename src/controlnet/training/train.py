"""The training loop: one readable loop for every objective, on one process or many (accelerate).

:func:`train` is the loop; each of its parts is a method of one run: the optimizer step
(``grad_accum`` micro-batches of ``batch_size`` rows per process - the global batch is their
product with the process count -, AdamW, optional gradient clipping and EMA), then logging
(:mod:`.logs`), validation and checkpoints (:mod:`.checkpoints`) on their schedules. The data
order is a permutation drawn from (seed, epoch) (:mod:`.batches`) and every random draw comes
from (seed, step, micro-step), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..choices import DType
from ..model.empty import empty_copy
from ..model.fastpath import compile_modules, has_own_graphs
from .batches import run_batches
from .checkpoints import (
    EMA,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    prune_checkpoints,
    run_files,
    save_checkpoint,
)
from .config import TrainConfig, lr_factor
from .logs import Metrics
from .objectives import Objective, StepNoise
from .sharding import (
    all_finite,
    gather,
    is_sharded,
    prepare_sharding,
    unsharded_root,
    whole_copies_in_place,
)
from .stopping import StopRequests, TrainingStopped

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingStopped", "check_out", "train"]

#: (the objective, the step, the run folder: None for a process that scores and writes nothing)
Validator = Callable[[Objective, int, "Path | None"], dict[str, float]]
Exporter = Callable[[Objective, "dict[str, torch.Tensor] | None", Path], list[Path]]


class TrainingDiverged(ValueError):
    """A run whose loss or weights stopped being finite; nothing past the last good checkpoint
    was kept."""


@dataclass
class TrainResult:
    state: TrainState
    run_dir: Path
    seconds: float
    samples_per_second: float
    converged_at: int | None
    exported: list[Path]
    last_metrics: dict[str, float]
    main: bool = True  # whether this is process 0 of the run (the one that reports it)


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
    run = _Run(cfg, objective, dataset, validator, accelerator)
    with StopRequests() as stop:  # Ctrl-C / SIGTERM: stop after the step, with a checkpoint
        while run.state.step < run.total:
            run.step()
            if run.due(cfg.log_every):
                run.log()
            if validator is not None and run.due(cfg.validate_every):
                run.validate()
            saved = cfg.save_checkpoints and run.due(cfg.checkpoint_every)
            if saved:
                run.checkpoint()
            if run.state.step < run.total and stop.agreed(run.accel, exchange=run.due(cfg.log_every)):
                run.halt(stop.signal or "a signal to another process", saved)
    return run.finish(exporter)


def check_out(cfg: TrainConfig) -> None:
    """Refuse to start a fresh run in a folder that holds an earlier one (its metrics, checkpoints
    and export would be overwritten, and a later --resume would continue a mix of both), unless
    ``cfg`` says to resume it or to overwrite it."""
    earlier = [] if cfg.resume or cfg.overwrite else run_files(cfg.out)
    if earlier:
        names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise ValueError(
            f"{cfg.out} holds an earlier training run ({names}): continue it with --resume, "
            "start afresh with --overwrite (which removes it), or give another --out"
        )


class _Run:
    """One training run: set up from its config (resumed from its newest checkpoint when asked),
    then advanced by :meth:`step`, with :meth:`log`, :meth:`validate` and :meth:`checkpoint` on
    their schedules, and closed by :meth:`finish`."""

    def __init__(
        self,
        cfg: TrainConfig,
        objective: Objective,
        dataset: Dataset,
        validator: Validator | None,
        accelerator: Accelerator | None,
    ) -> None:
        cfg.validate()
        if accelerator is None:
            # accelerate keeps one precision per process: a later run in the same process (a notebook,
            # a sweep) with another precision starts from a fresh state (the distributed one is kept)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
        precision = DType.parse(cfg.mixed_precision)
        accel = accelerator or Accelerator(mixed_precision=precision.accelerate, cpu=cfg.use_cpu())
        self.cfg, self.objective, self.validator, self.accel = cfg, objective, validator, accel
        self.rank, world, self.device = accel.process_index, accel.num_processes, accel.device
        self.main = accel.is_main_process
        self.run_dir = Path(cfg.out)
        if not cfg.resume:
            self._claim()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        n_val = min(cfg.validation_count, max(0, len(dataset) - 1)) if validator is not None else 0
        train_idx = np.arange(len(dataset) - n_val)
        self.global_batch = cfg.batch_size * world
        batches_per_epoch = len(train_idx) // self.global_batch
        steps_per_epoch = batches_per_epoch // cfg.grad_accum
        if steps_per_epoch < 1:
            raise ValueError(
                f"the training set has {len(train_idx)} items, fewer than one optimizer step's "
                f"{self.global_batch * cfg.grad_accum} (batch {cfg.batch_size} x {world} processes "
                f"x {cfg.grad_accum} accumulation)"
            )
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch  # type: ignore[operator]

        objective.prepare(self.device, precision.torch)
        if cfg.gradient_checkpointing:
            objective.enable_gradient_checkpointing()
        if cfg.compile:
            compile_modules(objective.networks(), mode=cfg.compile_mode, training=True)
        self.graphed = has_own_graphs(objective.networks())
        groups = objective.param_groups(cfg.lr, cfg.decoder_lr)
        self.base_lrs = [g["lr"] for g in groups]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")
        self.sharded = is_sharded(accel)
        prepare_sharding(accel, objective)
        # the exporter's unsharded copies of the trained modules (on the meta device until filled)
        trained = objective.trainable_modules().items()
        self.copies = {n: empty_copy(m) for n, m in trained} if self.sharded else {}
        self.model, self.optimizer = accel.prepare(objective, optimizer)
        # after prepare: sharding replaces the parameters (by slices of them) in their modules
        self.named = {
            f"{m}.{n}": p
            for m, mod in objective.trainable_modules().items()
            for n, p in mod.named_parameters()
            if p.requires_grad
        }
        self.ema = EMA(self.named, cfg.ema_decay) if cfg.ema_decay else None
        self.state = self._resume() if cfg.resume else TrainState()

        self.metrics = Metrics(self.run_dir, self.main, self.state.step)
        run_info = _read_json(self.run_dir / "run.json") if cfg.resume else {}
        self.converged_at: int | None = run_info.get("converged_at")
        if self.main:
            info = {
                "config": asdict(cfg),
                "processes": world,
                "global_batch": self.global_batch * cfg.grad_accum,
            }
            _write_json(self.run_dir / "run.json", {**run_info, **info})
        self.data = run_batches(
            dataset,
            self.state,
            train_idx,
            seed=cfg.seed,
            global_batch=self.global_batch,
            rank=self.rank,
            batch=cfg.batch_size,
            batches_per_epoch=batches_per_epoch,
            num_workers=cfg.num_workers,
            device=self.device,
        )
        self.bar = tqdm(
            total=self.total,
            initial=self.state.step,
            desc="training",
            unit="step",
            disable=not (self.main and cfg.progress),
        )
        self.started, self.start_step = time.perf_counter(), self.state.step
        self.mark, self.mark_step = self.started, self.state.step  # throughput: per logging window
        self.window: list[torch.Tensor] = []
        self.last: dict[str, float] = {}

    def _claim(self) -> None:
        """A fresh run may not mix with an earlier one in its folder: refused (:func:`check_out`),
        or with ``overwrite`` the earlier run's files are removed first."""
        check_out(self.cfg)
        if self.main:
            for path in run_files(self.run_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.accel.wait_for_everyone()

    def _resume(self) -> TrainState:
        """The state of the run folder's newest checkpoint, its weights, optimizer, EMA and random
        generators restored (a fresh state when there is none yet)."""
        ckpt_path = latest_checkpoint(self.run_dir)
        if ckpt_path is None:
            return TrainState()
        ckpt = load_checkpoint(ckpt_path)
        self.objective.load_trainable_state(ckpt.trainable)
        load_optimizer_state(self.optimizer, self.objective.trainable_modules(), ckpt.optimizer_state)
        if self.ema is not None:
            if ckpt.ema is None:
                raise ValueError(f"{ckpt_path}: this run uses EMA but the checkpoint has none")
            self.ema.load_state_dict(ckpt.ema)
        ckpt.restore_rng()
        if self.main:
            print(f"resuming from {ckpt_path} at step {ckpt.state.step}")
        return ckpt.state

    def due(self, every: int) -> bool:
        """Whether a task run every ``every`` steps (and after the last) is due now."""
        return self.state.step % every == 0 or self.state.step == self.total

    def step(self) -> None:
        """One optimizer step: ``grad_accum`` micro-batches (gradients synchronised on the last),
        clipping, the update, the EMA."""
        cfg, state, accel = self.cfg, self.state, self.accel
        factor = lr_factor(cfg, state.step, self.total)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * factor
        for micro in range(cfg.grad_accum):
            batch = next(self.data)
            rows = slice(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size)
            noise = StepNoise(cfg.seed, state.step, micro, self.global_batch, rows, self.device)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accel.no_sync(self.model)
            if self.graphed:  # a new step: inductor's graphs may reuse the last one's output buffers
                torch.compiler.cudagraph_mark_step_begin()
            with sync, accel.autocast():
                loss = self.model(batch, noise) / cfg.grad_accum
            accel.backward(loss)
            self.window.append(loss.detach() * cfg.grad_accum)
        if cfg.max_grad_norm is not None:
            accel.clip_grad_norm_(list(self.named.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        state.step += 1
        state.samples_seen += self.global_batch * cfg.grad_accum
        self.bar.update(1)

    def log(self) -> None:
        """The logging window's mean loss (over every process), learning rate, throughput and
        peak memory."""
        mean_loss = self.accel.reduce(torch.stack(self.window).mean(), reduction="mean").item()
        self.window.clear()
        if not math.isfinite(mean_loss):
            self.stop(f"the loss is not finite ({mean_loss})")
        now = time.perf_counter()
        sps = (self.state.step - self.mark_step) * self.global_batch * self.cfg.grad_accum / (now - self.mark)
        self.mark, self.mark_step = now, self.state.step
        self.last = {"loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": sps}
        if self.device.type == "cuda":
            self.last["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.log(self.state.step, self.last)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.last.items() if k != "lr"})

    def validate(self) -> None:
        """The validator's scores on process 0 (sharded, every process samples with it, and process
        0 alone writes); the first crossing of the score threshold is the sudden-convergence step."""
        cfg, step = self.cfg, self.state.step
        assert self.validator is not None
        scores: dict[str, float] = {}
        if self.main or self.sharded:
            with unsharded_root(self.model):
                scores = self.validator(
                    self.accel.unwrap_model(self.model), step, self.run_dir if self.main else None
                )
        if self.main:
            self.metrics.log(step, scores)
            self.last.update(scores)
            name = f"score/{cfg.score_name}" if cfg.score_name else None
            threshold = cfg.score_threshold
            if (
                self.converged_at is None
                and name in scores
                and threshold is not None
                and scores[name] >= threshold
            ):
                self.converged_at = step
                crossed = f"{cfg.score_name} = {scores[name]:.3f} crossed {threshold}"
                self.bar.write(f"sudden convergence: {crossed} at step {step}")
            self.metrics.plot(self.run_dir, {f"threshold {threshold}": threshold} if threshold else None)
        self.accel.wait_for_everyone()

    def checkpoint(self) -> None:
        """An atomic checkpoint of everything a resume needs; the oldest beyond ``keep_checkpoints``
        go."""
        self.check_finite()
        # whole tensors on process 0 (sharded, every process takes part in gathering them)
        trainable = gather(self.objective.trainable_state(), self.main)
        optim = gather(optimizer_state(self.optimizer, self.objective.trainable_modules()), self.main)
        ema = self.whole_ema()
        if self.main:
            decay = self.ema.decay if self.ema is not None else None
            save_checkpoint(self.run_dir, self.state, trainable, optim, asdict(self.cfg), ema, decay)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
            info = _read_json(self.run_dir / "run.json")
            _write_json(self.run_dir / "run.json", {**info, "converged_at": self.converged_at})
        self.accel.wait_for_everyone()

    def check_finite(self) -> None:
        """Stop (:meth:`stop`) before a checkpoint or an export would keep weights that are not
        finite, so that every checkpoint a run leaves holds finite weights."""
        bad = all_finite(self.accel, self.named)
        if bad is not None:
            self.stop(f"the weights are not finite ({bad} holds NaN or inf)")

    def stop(self, what: str) -> None:
        """End the run with a message saying at which step ``what`` happened and which checkpoint
        to go back to (every one written holds finite weights)."""
        self.bar.close()
        last = latest_checkpoint(self.run_dir)
        kept = (
            f"the newest checkpoint, {last.name}, holds finite weights" if last else "no checkpoint was kept"
        )
        raise TrainingDiverged(
            f"step {self.state.step}: {what}; training stopped ({kept}: lower --lr, or clip gradients "
            "with --max-grad-norm, and run again)"
        )

    def halt(self, why: str, saved: bool) -> None:
        """End the run on request after its step: a checkpoint (unless this step wrote one) that
        ``--resume`` continues exactly."""
        if not saved:
            self.checkpoint()
        self.bar.close()
        last = latest_checkpoint(self.run_dir)
        raise TrainingStopped(
            f"{why}: stopped after step {self.state.step} of {self.total}, "
            f"{last.name if last else 'a checkpoint'} written; continue with --resume --out {self.run_dir}"
        )

    def whole_ema(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights whole on process 0 (every process takes part), or None without EMA."""
        return gather(self.ema.state_dict(), self.main) if self.ema is not None else None

    def export(self, exporter: Exporter) -> list[Path]:
        """The exporter's files, written by process 0 (the EMA weights, when kept). Sharded, the
        trained modules are gathered whole into their unsharded copies, which stand in for them
        while the exporter runs."""
        ema = self.whole_ema()
        if not self.sharded:
            return exporter(self.objective, ema, self.run_dir / "final") if self.main else []
        live = self.objective.trainable_modules()
        with whole_copies_in_place(self.objective, live, self.copies, ema, self.main):
            return exporter(self.objective, None, self.run_dir / "final") if self.main else []

    def finish(self, exporter: Exporter | None) -> TrainResult:
        """The final export (the EMA weights, when kept), the curves and the run's record."""
        self.bar.close()
        state, run_dir = self.state, self.run_dir
        seconds = time.perf_counter() - self.started
        done = (state.step - self.start_step) * self.global_batch * self.cfg.grad_accum
        sps = done / seconds if seconds > 0 else math.nan
        exported: list[Path] = []
        self.check_finite()
        if exporter is not None:
            exported = self.export(exporter)
        if self.main:
            self.metrics.plot(run_dir)
            self.metrics.close()
            info = {
                **_read_json(run_dir / "run.json"),
                "converged_at": self.converged_at,
                "steps": state.step,
                "samples_seen": state.samples_seen,
                "seconds_this_session": round(seconds, 2),
                "samples_per_s_this_session": sps,
                "last_metrics": self.last,
                "exported": [str(p.relative_to(run_dir)) for p in exported],
            }
            _write_json(run_dir / "run.json", info)
        self.accel.wait_for_everyone()
        return TrainResult(state, run_dir, seconds, sps, self.converged_at, exported, self.last, self.main)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..imageio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1, default=str) + "\n").encode())
