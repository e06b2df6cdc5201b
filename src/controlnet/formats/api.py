"""One entry point per job, whatever the format: detect, load, save.

The format of a path is read from its content (folders by their config files, files by their
header and key names), never from its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..families.flux.base import FluxBase
from ..families.flux.controlnet import FluxControlNet
from ..families.qwenimage.base import QwenImageBase
from ..families.qwenimage.controlnet import QwenImageControlNet
from ..families.sd.adapter import T2IAdapter
from ..families.sd.base import UNetBase
from ..families.sd.configs import Family
from ..families.sd.controlnet import ControlNet, ControlNetConfig
from ..families.sd.union import UnionControlNet
from ..families.sd3.base import SD3Base
from ..families.sd3.controlnet import SD3ControlNet
from ..families.zimage.base import ZImageBase
from ..families.zimage.controlnet import ZImageControlNet
from . import adapter, dit_base, dit_controlnet, flux_bfl, flux_files, lm_base, ours, sd3_single
from . import control_lora as clora
from . import diffusers as dif
from . import original as orig
from .build import BaseConfig, Loader, build_unet, make_base
from .checkpoint import CheckpointError, TensorFile, list_keys, open_tensors, shapes_only
from .lora import is_lora_key

__all__ = [
    "Detected",
    "Format",
    "check_loads",
    "detect",
    "generation_settings",
    "load_base",
    "load_controlnet",
    "load_unet",
    "needs_base",
    "save_base",
    "save_controlnet",
]

PathLike = str | os.PathLike
CONTROLNET, BASE = "controlnet", "base"


class Format(Enum):
    """On-disk formats: the original single file, diffusers folders, and ours."""

    ORIGINAL = "original"
    DIFFUSERS = "diffusers"
    CONTROLNET = "controlnet"  # ours: one safetensors file with its config in the metadata


#: the layouts of T2I-Adapters: diffusers' folders, single files (TencentARC's or diffusers' keys)
ADAPTER_FOLDER = "T2I-Adapter folder"
ADAPTER_FILE = "T2I-Adapter file"


@dataclass
class Detected:
    """What a path holds. ``kinds`` lists 'controlnet' and/or 'base'; ``layout`` is for people.
    ``control_lora``: a Control-LoRA (original names), read only, built on a base model's UNet."""

    path: Path
    format: Format
    kinds: tuple[str, ...]
    layout: str
    tensors: TensorFile | None = field(default=None, repr=False)  # None for folders
    control_lora: bool = False
    family: str = "sd"  # the model family: 'sd' (the UNets), 'flux', 'sd3', 'qwenimage' or 'zimage'


def detect(path: PathLike) -> Detected:
    """Tell the format and contents of a file or folder (reads headers and names, no weights)."""
    path = Path(path)
    if path.is_dir():
        if sd3_single.sd3_folder_file(path) is not None:
            layout = "SD3 files (Stability AI layout)"
            return Detected(path, Format.ORIGINAL, (BASE,), layout, family="sd3")
        if flux_files.is_flux_files(path):
            layout = "Flux.1 files (Black Forest Labs layout)"
            return Detected(path, Format.ORIGINAL, (BASE,), layout, family="flux")
        spec = dit_base.pipeline_spec(path)
        if spec is not None:
            return Detected(path, Format.DIFFUSERS, (BASE,), f"{spec.pipeline} folder", family=spec.family)
        lm_spec = lm_base.spec_of_folder(path)
        if lm_spec is not None:
            layout = f"{lm_spec.pipeline} folder"
            return Detected(path, Format.DIFFUSERS, (BASE,), layout, family=lm_spec.family)
        cn_spec = dit_controlnet.spec_of(path, None)
        if cn_spec is not None:
            layout = f"{cn_spec.label} ControlNet folder"
            return Detected(path, Format.DIFFUSERS, (CONTROLNET,), layout, family=cn_spec.family)
        if dif.is_controlnet_folder(path):
            return Detected(path, Format.DIFFUSERS, (CONTROLNET,), "ControlNet folder")
        if dif.is_adapter_folder(path):  # a control model beside ControlNets: loaded where they are
            return Detected(path, Format.DIFFUSERS, (CONTROLNET,), ADAPTER_FOLDER)
        if dif.is_pipeline_folder(path):
            return Detected(path, Format.DIFFUSERS, (BASE,), "pipeline folder")
        raise CheckpointError(
            f"{path}: unknown folder (neither a diffusers ControlNet with config.json nor a pipeline "
            "with model_index.json)"
        )
    tf = open_tensors(path)
    if sd3_single.is_sd3_single_file(tf):
        layout = "SD3 single file (Stability AI layout)"
        return Detected(path, Format.ORIGINAL, (BASE,), layout, tf, family="sd3")
    if flux_bfl.is_bfl_transformer(tf):
        layout = "Flux.1 transformer, Black Forest Labs layout"
        return Detected(path, Format.ORIGINAL, (BASE,), layout, tf, family="flux")
    spec = dit_base.spec_of_file(tf)
    if spec is not None:
        return Detected(path, Format.CONTROLNET, (BASE,), f"{spec.label} base model", tf, family=spec.family)
    lm_spec = lm_base.spec_of_file(tf)
    if lm_spec is not None:
        layout = f"{lm_spec.label} base model"
        return Detected(path, Format.CONTROLNET, (BASE,), layout, tf, family=lm_spec.family)
    cn_spec = dit_controlnet.spec_of(path, tf)
    if cn_spec is not None:
        if ours.kind_of(tf) is not None:
            layout = f"{cn_spec.label} ControlNet"
            return Detected(path, Format.CONTROLNET, (CONTROLNET,), layout, tf, family=cn_spec.family)
        layout = f"{cn_spec.label} ControlNet, published layout (no config)"
        return Detected(path, Format.ORIGINAL, (CONTROLNET,), layout, tf, family=cn_spec.family)
    if adapter.is_adapter_file(tf):
        return Detected(path, Format(adapter.file_format(tf)), (CONTROLNET,), ADAPTER_FILE, tf)
    kind = ours.kind_of(tf)
    if kind is not None:
        what = "ControlNet" if kind == ours.CONTROLNET else "base model"
        return Detected(path, Format.CONTROLNET, (kind,), what, tf)
    has_control = bool(tf.with_prefix(orig.CONTROL))
    has_base = bool(tf.with_prefix(orig.UNET))
    if has_control or has_base:
        kinds = tuple(k for k, present in ((BASE, has_base), (CONTROLNET, has_control)) if present)
        if has_control and has_base:
            layout = "ControlNet v1.0 style: base model + control_model"
        elif has_control:
            layout = "ControlNet v1.1 style: control_model only"
        else:
            layout = "Stable Diffusion single file"
        return Detected(path, Format.ORIGINAL, kinds, layout, tf)
    if clora.is_control_lora(tf):
        layout = "Control-LoRA: low-rank changes to a base UNet"
        return Detected(path, Format.ORIGINAL, (CONTROLNET,), layout, tf, control_lora=True)
    if dif.is_union_file(tf):
        layout = "bare SDXL Union ControlNet weights, no config.json"
        return Detected(path, Format.DIFFUSERS, (CONTROLNET,), layout, tf)
    if "controlnet_cond_embedding.conv_in.weight" in tf:
        return Detected(path, Format.DIFFUSERS, (CONTROLNET,), "bare ControlNet weights, no config.json", tf)
    if any(is_lora_key(k) for k in tf):
        raise CheckpointError(
            f"{path}: a LoRA file, not a model: merge it into a base model with --lora "
            "(see docs/formats.md, LoRA files)"
        )
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (no control_model.*, model.diffusion_model.*, "
        f"controlnet_cond_embedding.* or our metadata); first keys: {list_keys(list(tf)[:5], 5)}"
    )


def _need(d: Detected, kind: str) -> None:
    if kind not in d.kinds:
        held = " and ".join(d.kinds)
        raise CheckpointError(
            f"{d.path}: holds no {'ControlNet' if kind == CONTROLNET else 'base model'} (it is a {held})"
        )


def load_controlnet(
    path: PathLike,
    *,
    dtype: torch.dtype | None = None,
    unet_config: dict[str, Any] | None = None,
    config: ControlNetConfig | None = None,
    base_unet: UNet2DConditionModel | None = None,
    ldm_config: PathLike | None = None,
) -> ControlNet | FluxControlNet | SD3ControlNet | QwenImageControlNet | ZImageControlNet | T2IAdapter:
    """Load a ControlNet from any supported file or folder (a Flux one too).

    ``dtype`` casts floating-point tensors (default: as stored). ``unet_config`` / ``config``
    describe the architecture of files that carry none (original-layout or bare diffusers-layout
    weights) when it is not a released SD1.x/SD2.x/SDXL size; files we wrote carry their own.
    ``base_unet``: the UNet the ControlNet will run beside, which a Control-LoRA is built on
    (required for one; a whole ControlNet does not read it). ``ldm_config``: the original YAML of
    an original-layout file, in place of a same-named ``.yaml`` beside it.
    """
    d = detect(path)
    _need(d, CONTROLNET)
    ldm_config_fits(d, ldm_config)
    if d.family != "sd":
        cn_spec = dit_controlnet.SPECS[d.family]
        if d.tensors is not None:
            return dit_controlnet.load_file(cn_spec, d.tensors, dtype=dtype)
        return dit_controlnet.load_folder(cn_spec, d.path, dtype=dtype)
    if d.layout == ADAPTER_FILE:
        assert d.tensors is not None
        return adapter.load_adapter_file(d.tensors, dtype=dtype)
    if d.control_lora:
        assert d.tensors is not None
        if base_unet is None:
            raise CheckpointError(
                f"{d.path}: a Control-LoRA stores a ControlNet as changes to its base model's UNet: "
                "load it with the base model (convert: --base)"
            )
        return clora.load_control_lora(d.tensors, base_unet, dtype=dtype)
    if d.format is Format.CONTROLNET:
        assert d.tensors is not None
        return ours.load_controlnet(d.tensors, dtype=dtype)
    if d.format is Format.ORIGINAL:
        assert d.tensors is not None
        return orig.load_controlnet(
            d.tensors, unet_config=unet_config, config=config, dtype=dtype, ldm_config=_path(ldm_config)
        )
    if d.tensors is not None:
        return dif.load_controlnet_file(d.tensors, unet_config=unet_config, config=config, dtype=dtype)
    if d.layout == ADAPTER_FOLDER:
        return dif.load_adapter(d.path, dtype=dtype)
    return dif.load_controlnet(d.path, dtype=dtype)


def _path(p: PathLike | None) -> Path | None:
    return None if p is None else Path(p)


def ldm_config_fits(d: Detected, ldm_config: PathLike | None) -> None:
    if ldm_config is not None and (d.format is not Format.ORIGINAL or d.control_lora or d.family != "sd"):
        raise CheckpointError(
            f"{d.path}: an original YAML (--config) describes original-layout files only; this is a "
            f"{d.layout} ({d.format.value} format), which carries its own architecture"
        )


def needs_base(path: PathLike) -> bool:
    """Whether the ControlNet at ``path`` is built on a base model's UNet (a Control-LoRA)."""
    return detect(path).control_lora


def _base_loader(
    path: PathLike,
    dtype: torch.dtype | None,
    config: BaseConfig | None,
    family: Family | None,
    ldm_config: PathLike | None = None,
) -> tuple[BaseConfig, Loader]:
    d = detect(path)
    _need(d, BASE)
    ldm_config_fits(d, ldm_config)
    if d.format is Format.CONTROLNET:
        assert d.tensors is not None
        return ours.base_loader(d.tensors, dtype=dtype)
    if d.format is Format.ORIGINAL:
        assert d.tensors is not None
        return orig.base_loader(d.tensors, config=config, dtype=dtype, ldm_config=_path(ldm_config))
    return dif.base_loader(d.path, family=family, dtype=dtype)


def load_base(
    path: PathLike,
    *,
    dtype: torch.dtype | None = None,
    config: BaseConfig | None = None,
    family: Family | None = None,
    ldm_config: PathLike | None = None,
) -> UNetBase | FluxBase | SD3Base | QwenImageBase | ZImageBase:
    """Load a base model (UNet, VAE, text encoder(s), offline tokenizer(s), schedule) from an
    original single file (also a v1.0 ControlNet file's base part), a diffusers pipeline folder or
    our format. An original-layout file's architecture is read off its tensors; ``ldm_config`` (its
    original YAML) or ``config`` (a whole :class:`BaseConfig`) settle what they cannot tell;
    ``family`` overrides the guess for a diffusers folder without a tokenizer."""
    d = detect(path)
    if d.family == "sd":
        base = make_base(*_base_loader(path, dtype, config, family, ldm_config))
    else:
        _need(d, BASE)
        ldm_config_fits(d, ldm_config)
        base = _transformer_base(d, dtype)
    base.settings = generation_settings(path)  # (our format's; the other layouts carry none)
    return base


def _transformer_base(
    d: Detected, dtype: torch.dtype | None
) -> FluxBase | SD3Base | QwenImageBase | ZImageBase:
    """The transformer family's base model that ``d`` detected, in its layout."""
    if d.format is Format.ORIGINAL:
        if d.family == "sd3":
            if d.tensors is not None:
                return sd3_single.load_sd3_single_file(d.tensors, dtype=dtype)
            tf = sd3_single.sd3_folder_file(d.path)
            assert tf is not None
            return sd3_single.load_sd3_single_file(tf, folder=d.path, dtype=dtype)
        if d.tensors is not None:
            raise CheckpointError(
                f"{d.path}: a Flux.1 transformer alone; load the folder that holds it with its "
                "ae.safetensors, CLIP-L, T5 and T5's tokenizer.json"
            )
        return flux_files.load_flux_files(d.path, dtype=dtype)
    loader = lm_base if d.family in lm_base.SPECS else dit_base
    if d.tensors is not None:
        return loader.load_file(d.tensors, dtype=dtype)
    return loader.load_folder(d.path, dtype=dtype)


def check_loads(path: PathLike, *, ldm_config: PathLike | None = None) -> dict[str, str | None]:
    """What each loader says of ``path``, per part it holds ('controlnet', 'base'): None where it
    loads, else the one-line refusal. Every key and shape is checked and every module built, with
    no weights read (:func:`~.checkpoint.shapes_only`); a Control-LoRA is checked against its base
    model when loaded, so it is reported as such."""
    d = detect(path)
    out: dict[str, str | None] = {}
    with shapes_only():
        for kind in d.kinds:
            if kind == CONTROLNET and d.control_lora:
                out[kind] = "checked when loaded with its base model (a Control-LoRA)"
                continue
            try:
                if kind == CONTROLNET:
                    load_controlnet(path, ldm_config=ldm_config)
                else:
                    load_base(path, ldm_config=ldm_config)
                out[kind] = None
            except CheckpointError as e:
                out[kind] = str(e)
    return out


def generation_settings(path: PathLike) -> dict[str, Any]:
    """The generation settings the base model at ``path`` carries: our format's metadata (read
    from the header alone); {} for any other layout, or none recorded."""
    d = detect(path)
    if d.format is not Format.CONTROLNET or d.tensors is None or BASE not in d.kinds:
        return {}
    return ours.stored_settings(d.tensors)


def load_unet(
    path: PathLike,
    *,
    dtype: torch.dtype | None = None,
    config: BaseConfig | None = None,
    family: Family | None = None,
    ldm_config: PathLike | None = None,
) -> UNet2DConditionModel:
    """Only the UNet of a base model (what init and transfer need), locked like in load_base."""
    found = detect(path)
    if found.family not in (None, "sd"):  # (a transformer family's base: no UNet to read)
        raise CheckpointError(f"{path}: holds a {found.layout}, not a UNet base model (SD1.x, SD2.x, SDXL)")
    cfg, load = _base_loader(path, dtype, config, family, ldm_config)
    unet = load("unet", build_unet(cfg.unet))
    return unet.requires_grad_(False).eval()


def save_controlnet(
    cn: ControlNet | FluxControlNet | SD3ControlNet | QwenImageControlNet | ZImageControlNet | T2IAdapter,
    path: PathLike,
    fmt: Format | str = Format.CONTROLNET,
    *,
    base: UNetBase | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``cn`` in ``fmt`` atomically; returns the paths written. ``base`` (original format
    only) embeds a base model, as in the v1.0 files."""
    fmt = Format(fmt)
    path = Path(path)
    if isinstance(cn, T2IAdapter):
        if base is not None:
            raise ValueError("a T2I-Adapter's file holds the adapter alone")
        target = path if fmt is Format.DIFFUSERS else _safetensors_path(path)
        return adapter.save_adapter(cn, target, fmt.value, overwrite=overwrite)
    if isinstance(cn, (FluxControlNet, SD3ControlNet, QwenImageControlNet, ZImageControlNet)):
        if base is not None:
            raise ValueError("a transformer ControlNet's file holds the ControlNet alone")
        target = path if fmt is Format.DIFFUSERS else _safetensors_path(path)
        return dit_controlnet.save(cn, target, fmt.value, overwrite=overwrite)
    if isinstance(cn, UnionControlNet) and fmt is not Format.DIFFUSERS:
        raise ValueError(
            "a Union ControlNet is written as a diffusers folder (--to diffusers), as it is published"
        )
    if base is not None and fmt is not Format.ORIGINAL:
        raise ValueError("a base model can be embedded in the original format only")
    if fmt is Format.ORIGINAL:
        return orig.save_controlnet(cn, _safetensors_path(path), base=base, overwrite=overwrite)
    if fmt is Format.DIFFUSERS:
        return dif.save_controlnet(cn, path, overwrite=overwrite)
    return ours.save_controlnet(cn, _safetensors_path(path), overwrite=overwrite)


def save_base(
    base: UNetBase | FluxBase | SD3Base | QwenImageBase | ZImageBase,
    path: PathLike,
    fmt: Format | str = Format.CONTROLNET,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write a base model in ``fmt`` atomically (see docs/formats.md for what the original layout
    of an SD2.x model lacks)."""
    fmt = Format(fmt)
    path = Path(path)
    if isinstance(base, (QwenImageBase, ZImageBase)):
        if fmt is Format.ORIGINAL:
            raise ValueError(
                f"a {base.family.label} base model has no 'original' layout: write 'controlnet' (ours) or "
                "'diffusers'"
            )
        target = path if fmt is Format.DIFFUSERS else _safetensors_path(path)
        return lm_base.save(base, target, fmt.value, overwrite=overwrite)
    if isinstance(base, (FluxBase, SD3Base)):
        if fmt is Format.ORIGINAL:
            if isinstance(base, SD3Base):  # Stability AI's single file
                return sd3_single.save_sd3_single_file(base, _safetensors_path(path), overwrite=overwrite)
            return flux_files.save_flux_files(base, path, overwrite=overwrite)  # BFL's files, in a folder
        target = path if fmt is Format.DIFFUSERS else _safetensors_path(path)
        return dit_base.save(base, target, fmt.value, overwrite=overwrite)
    if fmt is Format.ORIGINAL:
        return orig.save_base(base, _safetensors_path(path), overwrite=overwrite)
    if fmt is Format.DIFFUSERS:
        return dif.save_base(base, path, overwrite=overwrite)
    return ours.save_base(base, _safetensors_path(path), overwrite=overwrite)


def _safetensors_path(path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weight files are written as safetensors; name the output *.safetensors")
    return path
