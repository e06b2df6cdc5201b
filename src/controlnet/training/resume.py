"""The settings of a resumed run: those its folder recorded (``run.json``), so ``--resume`` needs
no flag repeated. A setting given again that differs from the recorded one is refused by name,
except those that say how long the run goes and how it reports, which a resumed run may change."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .recipes import RunSpec
from .train import TrainConfig

__all__ = ["MAY_CHANGE", "resumed_settings"]

#: what a resumed run may change: its length and its reporting, not what a step computes
MAY_CHANGE = frozenset(
    {
        "steps",
        "epochs",
        "checkpoint_every",
        "keep_checkpoints",
        "validate_every",
        "log_every",
        "num_workers",
        "progress",
    }
)
#: the flag of a setting, where it is not the setting's name
_FLAGS = {
    "annotator_params": "--annotator-param",
    "progress": "--quiet",
    "extra": "(the objective's options)",
}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _plain(value: Any) -> Any:
    """A value as run.json holds it (enums as their values, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def resumed_settings(
    out: str | Path, spec: dict[str, Any], cfg: dict[str, Any]
) -> tuple[RunSpec, TrainConfig]:
    """The run in ``out`` as recorded, with the settings given (``spec``: RunSpec fields,
    ``cfg``: TrainConfig fields, each only those the user gave) over it. ValueError naming the
    folder when it holds no recorded run, and naming each flag given that differs from the
    recorded value and may not change (:data:`MAY_CHANGE`)."""
    path = Path(out) / "run.json"
    try:
        info = json.loads(path.read_text())
        recorded_cfg = dict(info["config"])
        recorded_spec = dict(recorded_cfg.get("extra", {})["spec"])
    except FileNotFoundError:
        raise ValueError(f"{out}: no run.json, so no run to resume (start one without --resume)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a training run's record ({type(e).__name__}: {e})") from None
    conflicts = [
        f"{_flag(name)} {_plain(value)} (the run has {recorded.get(name)!r})"
        for given, recorded in ((spec, recorded_spec), (cfg, recorded_cfg))
        for name, value in given.items()
        if name not in MAY_CHANGE and _plain(value) != recorded.get(name)
    ]
    if conflicts:
        raise ValueError(
            f"{out} was trained with other settings: {'; '.join(conflicts)}. A resumed run keeps its "
            f"settings (run.json); only its length and reporting may change ("
            + ", ".join(_flag(n) for n in sorted(MAY_CHANGE))
            + "). Start a new run in another --out to train differently"
        )
    known_spec = {f.name for f in fields(RunSpec)}
    known_cfg = {f.name for f in fields(TrainConfig)}
    recorded_spec = {k: v for k, v in recorded_spec.items() if k in known_spec}
    extra = {k: v for k, v in recorded_cfg.get("extra", {}).items() if k != "spec"}
    recorded_cfg = {k: v for k, v in recorded_cfg.items() if k in known_cfg and k != "extra"}
    run_spec = RunSpec(**{**recorded_spec, **spec})
    config = TrainConfig(
        **{**recorded_cfg, **cfg, "out": str(out), "resume": True, "overwrite": False, "extra": extra}
    )
    return run_spec, config
