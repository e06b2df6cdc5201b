"""Z-Image ControlNet files (Alibaba PAI's Union ControlNets), read by the shared reader of
transformer ControlNets (:mod:`.dit_controlnet`): what a published file without a config holds.

The published single files hold diffusers' ``ZImageControlNetModel`` names: ``control_layers.N``
(control blocks), ``control_all_x_embedder.2-1`` (the condition's embedder) and, for some,
``control_noise_refiner.N``. Read off the tensors: the width, heads (``attention.norm_q``: the
head size), key/value heads, the condition's channels (the embedder's input over a 2x2 patch),
and how the condition is refined - control blocks in ``control_noise_refiner`` (with a
``before_proj``: Union 2.1 and its lite form), plain blocks there, or none (the main control
blocks refine it: Union 2.0). Where each control block's residual goes is not in the tensors: the
published counts have published places (6 blocks: every 5th layer; 15: every 2nd; 3: layers 0,
14 and 28); another count needs the diffusers folder, whose ``config.json`` names them.
"""

from __future__ import annotations

from typing import Any

from ..families.zimage.controlnet import ZImageControlNetConfig
from .build import numbered, shape_of
from .checkpoint import TensorFile

__all__ = ["MARKERS", "PUBLISHED_PLACES", "describe", "from_diffusers", "inferred", "to_diffusers"]

#: keys every Z-Image ControlNet holds
MARKERS = ("control_all_x_embedder.2-1.weight", "control_layers.0.before_proj.weight")
#: the published ControlNets' control-block counts -> the main layers their residuals go after
PUBLISHED_PLACES = {
    6: (0, 5, 10, 15, 20, 25),
    15: tuple(range(0, 30, 2)),
    3: (0, 14, 28),
}


def _shape(tf: TensorFile, key: str) -> tuple[int, ...]:
    return shape_of(tf.shapes, key, str(tf.path))


def inferred(tf: TensorFile) -> tuple[dict[str, Any], ZImageControlNetConfig]:
    """(transformer fields, ControlNet config) of a published file; ValueError where the tensors
    cannot tell (a count of control blocks no published ControlNet has)."""
    dim, patch_in = _shape(tf, "control_all_x_embedder.2-1.weight")
    head = _shape(tf, "control_layers.0.attention.norm_q.weight")[0]
    blocks = len(numbered(tf.shapes, r"control_layers\.(\d+)\..*"))
    if blocks not in PUBLISHED_PLACES:
        raise ValueError(
            f"{blocks} control blocks: a file without a config does not say after which layers their "
            f"residuals go (the published ControlNets have {', '.join(map(str, PUBLISHED_PLACES))}); "
            "give the ControlNet's diffusers folder"
        )
    refiners = len(numbered(tf.shapes, r"control_noise_refiner\.(\d+)\..*"))
    if refiners == 0:
        refiner = "control_layers"
    elif "control_noise_refiner.0.before_proj.weight" in tf:
        refiner = "control_noise_refiner"
    else:
        refiner = None
    transformer = {
        "dim": dim,
        "n_heads": dim // head,
        "n_kv_heads": _shape(tf, "control_layers.0.attention.to_k.weight")[0] // head,
        "n_refiner_layers": refiners or 2,
    }
    config = ZImageControlNetConfig(
        control_layers_places=PUBLISHED_PLACES[blocks],
        control_refiner_layers_places=None if refiner is None else (0, 1),
        control_in_dim=patch_in // 4,
        refiner=refiner,
    )
    return transformer, config


def from_diffusers(config: dict[str, Any]) -> ZImageControlNetConfig:
    refiner = config.get("add_control_noise_refiner")
    return ZImageControlNetConfig(
        control_layers_places=tuple(config["control_layers_places"]),
        control_refiner_layers_places=tuple(config.get("control_refiner_layers_places") or ()) or None,
        control_in_dim=int(config["control_in_dim"]),
        refiner=refiner,
    )


def to_diffusers(config: ZImageControlNetConfig) -> dict[str, Any]:
    return {
        "control_layers_places": list(config.control_layers_places),
        "control_refiner_layers_places": list(config.control_refiner_layers_places or []),
        "control_in_dim": config.control_in_dim,
        "add_control_noise_refiner": config.refiner,
    }


def describe(transformer: dict[str, Any], config: ZImageControlNetConfig) -> dict[str, Any]:
    return {
        "blocks": len(config.control_layers_places),
        "places": list(config.control_layers_places),
        "condition_channels": config.control_in_dim,
        "refiner": config.refiner or "plain blocks",
    }
