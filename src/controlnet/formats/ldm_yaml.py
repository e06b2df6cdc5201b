"""The original YAML (ldm / sgm / cldm) of a weight file: what it says beyond the tensors.

The v1.1 convention puts a same-named ``.yaml`` beside the weights; ``--config`` names one
anywhere. Only ``model.params`` is read: ``unet_config`` / ``network_config`` and
``control_stage_config`` params (heads, and structural fields checked against the tensors),
``parameterization``, ``scale_factor`` and the conditioner's time-id width (see :mod:`.infer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CheckpointError

__all__ = ["LdmOptions", "ldm_options"]


@dataclass(frozen=True)
class LdmOptions:
    """What an original YAML says beyond the tensors (empty without one)."""

    source: str = ""
    unet: dict[str, Any] = field(default_factory=dict)  # unet_config / network_config params
    control: dict[str, Any] = field(default_factory=dict)  # control_stage_config params
    parameterization: str | None = None
    scale_factor: float | None = None
    time_embed_dim: int | None = None

    def heads(self, control: bool) -> dict[str, Any]:
        """``num_heads`` / ``num_head_channels`` (the ControlNet's own first, then the UNet's)."""
        for params in (self.control, self.unet) if control else (self.unet,):
            got = {k: params[k] for k in ("num_heads", "num_head_channels") if _positive(params.get(k))}
            if got:
                return got
        return {}


def _positive(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _dig(d: Any, *path: str) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _time_embed_dim(params: Any) -> int | None:
    """The ``outdim`` of sgm's ConcatTimestepEmbedderND among the conditioner's embedders."""
    embedders = _dig(params, "conditioner_config", "params", "emb_models")
    for e in embedders if isinstance(embedders, list) else []:
        if isinstance(e, dict) and str(e.get("target", "")).endswith("ConcatTimestepEmbedderND"):
            out = _dig(e, "params", "outdim")
            if _positive(out):
                return int(out)
    return None


def ldm_options(weights: Path, config: Path | None = None) -> LdmOptions:
    """The YAML ``config`` (``--config``), else the same-named ``.yaml`` beside ``weights``, read."""
    path = config if config is not None else weights.with_suffix(".yaml")
    if config is None and not path.is_file():
        return LdmOptions()
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: config not found") from e
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not a readable YAML file ({type(e).__name__})") from e
    params = _dig(data, "model", "params")
    if not isinstance(params, dict):
        if config is not None:
            raise CheckpointError(f"{path}: not an original model config (no model.params)")
        return LdmOptions(str(path))
    unet = _dig(params, "unet_config", "params") or _dig(params, "network_config", "params")
    control = _dig(params, "control_stage_config", "params")
    scale = params.get("scale_factor")
    return LdmOptions(
        str(path),
        unet if isinstance(unet, dict) else {},
        control if isinstance(control, dict) else {},
        params.get("parameterization") if isinstance(params.get("parameterization"), str) else None,
        float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None,
        _time_embed_dim(params),
    )
