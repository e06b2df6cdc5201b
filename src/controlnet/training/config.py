"""A training run's settings (:class:`TrainConfig`), their checks, and the learning-rate schedule
they describe."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..choices import DType
from ..errors import SettingError
from ..model.fastpath import check_compile_mode

__all__ = ["TrainConfig", "lr_factor"]


#: settings that count something: at least 1
_COUNTS = ("steps", "epochs", "batch_size", "grad_accum", "checkpoint_every", "validate_every", "log_every")


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
    overwrite: bool = False  # start afresh in a folder that holds an earlier run (removing it)
    save_checkpoints: bool = True  # off only for throughput measurements
    cpu: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # the objective's options, recorded with the run

    def use_cpu(self) -> bool:
        """Whether the run keeps to the CPU: asked (``cpu``), or several processes on a machine
        without CUDA (which accelerate would otherwise run each on its own, not as one run)."""
        return self.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise SettingError("give exactly one of steps and epochs", "steps", "epochs")
        for name in _COUNTS:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SettingError(f"{name} must be >= 1, got {v}", name)
        if not (self.lr > 0 and self.decoder_lr > 0):  # (NaN is no learning rate either)
            got = f"lr={self.lr}, decoder_lr={self.decoder_lr}"
            raise SettingError(f"learning rates must be > 0, got {got}", "lr", "decoder_lr")
        for name in ("lr", "decoder_lr", "weight_decay", "max_grad_norm", "ema_decay", "score_threshold"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise SettingError(f"{name} must be a finite number, got {v}", name)
        if not self.weight_decay >= 0:
            raise SettingError(f"weight_decay must be >= 0, got {self.weight_decay}", "weight_decay")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SettingError(f"max_grad_norm must be > 0, got {self.max_grad_norm}", "max_grad_norm")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise SettingError(f"ema_decay must be in (0, 1), got {self.ema_decay}", "ema_decay")
        try:
            self.mixed_precision = DType.parse(self.mixed_precision)
        except ValueError:
            names = ", ".join(d.value for d in DType)
            raise SettingError(
                f"mixed_precision must be one of {names}, got {self.mixed_precision!r}", "mixed_precision"
            ) from None
        try:
            check_compile_mode(self.compile_mode, "compile_mode")
        except ValueError as e:
            raise SettingError(str(e), "compile_mode") from None
        if self.lr_schedule not in ("constant", "cosine"):
            raise SettingError(
                f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}", "lr_schedule"
            )
        if self.keep_checkpoints < 1:
            raise SettingError(
                f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}", "keep_checkpoints"
            )


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate's multiplier at ``step`` (0-based) of ``total``: a linear warm-up, then
    constant or a half cosine that reaches zero after the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup_steps) / span))
    return 1.0
