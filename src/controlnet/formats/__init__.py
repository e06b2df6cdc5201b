"""Checkpoint formats: every layout users have, in and out, offline and verified.

- original: single-file Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL) and the released
  ControlNet v1.0 (base + control) and v1.1 (control only, optional ``.yaml``) files.
- diffusers: ControlNet folders (``config.json`` + weights) and pipeline folders.
- controlnet (ours): one safetensors file with its architecture in the metadata.
- vae: standalone VAE files and folders, read into a base model's VAE architecture.
- lora: LoRA files (kohya / A1111 and diffusers / PEFT layouts) merged into a base model.
- control_lora: Control-LoRA files, ControlNets stored as low-rank changes to a base UNet.

Every load verifies every key and shape before assigning tensors to modules built on the meta
device (no second copy in memory); every write is atomic. See docs/formats.md.
"""

from .api import (
    Detected,
    Format,
    detect,
    generation_settings,
    load_base,
    load_controlnet,
    load_unet,
    needs_base,
    save_base,
    save_controlnet,
)
from .build import BaseConfig
from .checkpoint import CheckpointError
from .lora import merge_loras, read_lora
from .tools import (
    Inspection,
    check_compatible,
    convert,
    init_controlnet,
    inspect_checkpoint,
    transfer_controlnet,
)
from .vae import load_vae

__all__ = [
    "BaseConfig",
    "CheckpointError",
    "Detected",
    "Format",
    "Inspection",
    "check_compatible",
    "convert",
    "detect",
    "generation_settings",
    "init_controlnet",
    "inspect_checkpoint",
    "load_base",
    "load_controlnet",
    "load_unet",
    "load_vae",
    "merge_loras",
    "needs_base",
    "read_lora",
    "save_base",
    "save_controlnet",
    "transfer_controlnet",
]
