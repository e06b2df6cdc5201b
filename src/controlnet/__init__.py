"""ControlNet for Stable Diffusion-family models (Zhang & Agrawala, ICCV 2023).

Public API: the model (:class:`ControlNet`), the generic controlled block, and how residuals
enter a locked UNet (:mod:`controlnet.control`).
"""

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

__version__ = "0.1.0"

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
