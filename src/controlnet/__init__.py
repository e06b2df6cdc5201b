"""ControlNet for Stable Diffusion-family models (Zhang & Agrawala, ICCV 2023).

Public API: the model (:class:`ControlNet`), the generic controlled block, and how residuals
enter a locked UNet (:mod:`controlnet.model.control`). Names are imported on first use, so commands
that need no model (data generation, ``--help``) do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Control": "model.control",
    "ControlMode": "choices",
    "ControlledUNet": "families.sd.forward",
    "control_residuals": "model.control",
    "control_scales": "model.control",
    "controlled_unet_forward": "families.sd.forward",
    "soft_scales": "model.control",
    "ControlNet": "families.sd.controlnet",
    "ControlNetConfig": "families.sd.controlnet",
    "HintEncoder": "model.hint",
    "Family": "families.sd.configs",
    "unet_config": "families.sd.configs",
    "ControlledBlock": "model.zero",
    "Layout": "model.zero",
    "zero_conv": "model.zero",
    "zero_linear": "model.zero",
    "zero_module": "model.zero",
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
    from .choices import ControlMode
    from .families.sd.configs import Family, unet_config
    from .families.sd.controlnet import ControlNet, ControlNetConfig
    from .families.sd.forward import ControlledUNet, controlled_unet_forward
    from .model.control import Control, control_residuals, control_scales, soft_scales
    from .model.hint import HintEncoder
    from .model.zero import ControlledBlock, Layout, zero_conv, zero_linear, zero_module
