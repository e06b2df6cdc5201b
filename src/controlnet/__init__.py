"""ControlNet for Stable Diffusion-family models (Zhang & Agrawala, ICCV 2023).

Public API: the model (:class:`ControlNet`), the generic controlled block, and how residuals
enter a locked UNet (:mod:`controlnet.control`). Names are imported on first use, so commands
that need no model (data generation, ``--help``) do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Control": "control",
    "ControlMode": "control",
    "ControlledUNet": "control",
    "control_residuals": "control",
    "control_scales": "control",
    "controlled_unet_forward": "control",
    "soft_scales": "control",
    "ControlNet": "controlnet",
    "ControlNetConfig": "controlnet",
    "HintEncoder": "controlnet",
    "Family": "families",
    "unet_config": "families",
    "ControlledBlock": "zero",
    "Layout": "zero",
    "zero_conv": "zero",
    "zero_linear": "zero",
    "zero_module": "zero",
}

__all__ = [
    "Control",
    "ControlMode",
    "ControlNet",
    "ControlNetConfig",
    "ControlledBlock",
    "ControlledUNet",
    "Family",
    "HintEncoder",
    "Layout",
    "__version__",
    "control_residuals",
    "control_scales",
    "controlled_unet_forward",
    "soft_scales",
    "unet_config",
    "zero_conv",
    "zero_linear",
    "zero_module",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'controlnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .control import (
        Control,
        ControlledUNet,
        ControlMode,
        control_residuals,
        control_scales,
        controlled_unet_forward,
        soft_scales,
    )
    from .controlnet import ControlNet, ControlNetConfig, HintEncoder
    from .families import Family, unet_config
    from .zero import ControlledBlock, Layout, zero_conv, zero_linear, zero_module
