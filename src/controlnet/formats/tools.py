"""What users do with checkpoint files: inspect, convert, initialise, transfer, check a pairing."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..families.protocol import BaseModel
from ..families.sd.base import UNetBase
from ..families.sd.compat import check_compatible
from ..families.sd.configs import Family, family_of_unet_config
from ..families.sd.controlnet import ControlNet, ControlNetConfig
from ..model.control import control_type_choices
from ..model.empty import empty_copy
from ..model.twins import transfer_twins
from . import control_lora as clora
from . import diffusers as dif
from . import dit_controlnet, ours
from . import original as orig
from .api import (
    ADAPTER_FILE,
    ADAPTER_FOLDER,
    BASE,
    CONTROLNET,
    Detected,
    Format,
    check_loads,
    detect,
    ldm_config_fits,
    load_base,
    load_controlnet,
    load_unet,
    save_base,
    save_controlnet,
)
from .build import (
    numbered,
    stored_base_config,
    stored_controlnet_arch,
)
from .checkpoint import CheckpointError, TensorFile, read_json, shapes_only

__all__ = [
    "Inspection",
    "check_compatible",
    "convert",
    "init_controlnet",
    "inspect_checkpoint",
    "transfer_controlnet",
]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------ compatibility
def _check_same_network(a: torch.nn.Module, b: torch.nn.Module, a_name: str, b_name: str) -> None:
    sa = {k: v.shape for k, v in a.state_dict().items()}
    sb = {k: v.shape for k, v in b.state_dict().items()}
    if sa != sb:
        differ = sorted(k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k))
        raise CheckpointError(
            f"{a_name} and {b_name} are not the same architecture "
            f"({len(differ)} tensors differ, e.g. {differ[0]})"
        )


# ------------------------------------------------------------------------------------ init / transfer
def _is_path(x: object) -> bool:
    return isinstance(x, (str, os.PathLike))


def _label(x: object, default: str) -> str:
    return str(x) if _is_path(x) else default


def _unet_arg(
    x: PathLike | UNetBase | UNet2DConditionModel, dtype: torch.dtype | None = None
) -> UNet2DConditionModel:
    """The UNet of a base model given as a file or folder (only the UNet is loaded) or as a model."""
    return load_unet(x, dtype=dtype) if _is_path(x) else getattr(x, "unet", x)


def init_controlnet(
    base: PathLike | UNetBase | UNet2DConditionModel,
    *,
    config: Any = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> Any:
    """A new ControlNet for ``base``: every tensor with a twin in the UNet copied from it exactly,
    a freshly initialised hint encoder (seeded; the global RNG is left alone) and zero convs.
    ``dtype`` casts a base read from a file. A transformer family's base (a path) gets its own
    ControlNet (``config``: that family's, such as FluxControlNetConfig), copied the same way."""
    if _is_path(base) and detect(base).family != "sd":  # a transformer family's: its own copy
        model = load_base(base, dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model.new_controlnet(config)
    unet = _unet_arg(base, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ControlNet.from_unet(unet, config)


def transfer_controlnet(
    control: PathLike | nn.Module,
    from_base: PathLike | BaseModel | UNet2DConditionModel,
    to_base: PathLike | BaseModel | UNet2DConditionModel,
) -> nn.Module:
    """Move a ControlNet trained on ``from_base`` (A) to ``to_base`` (B), a model of the same
    architecture: ``new = control + (B - A)`` on every tensor that has a twin in the base's network
    (the trainable copy: :mod:`controlnet.model.twins`), computed in float32 (float64 if any input
    is) and stored in the ControlNet's dtype; the condition's encoder and the zero layers are kept.
    A UNet ControlNet or a transformer family's (whose bases, given as paths, load whole). Use the
    result with B's VAE and text encoders."""
    c_name, a_name, b_name = (
        _label(control, "the ControlNet"),
        _label(from_base, "base A"),
        _label(to_base, "base B"),
    )
    cn = load_controlnet(control) if _is_path(control) else control
    if isinstance(cn, ControlNet):
        a, b = _unet_arg(from_base), _unet_arg(to_base)
        check_compatible(cn, a, controlnet_name=c_name, base_name=a_name)
        check_compatible(cn, b, controlnet_name=c_name, base_name=b_name)
    else:
        bases = [load_base(x) if _is_path(x) else x for x in (from_base, to_base)]
        for base, name in zip(bases, (a_name, b_name)):
            try:
                base.check_controlnet(cn, controlnet_name=c_name, base_name=name)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        a, b = (base.denoiser for base in bases)
    _check_same_network(a, b, a_name, b_name)
    moved = transfer_twins(cn, a, b)
    if not moved:
        raise CheckpointError(f"{c_name} holds no copy of {a_name}'s weights: there is nothing to move")
    out = empty_copy(cn)
    out.load_state_dict(moved, assign=True)
    return out


# ------------------------------------------------------------------------------------ convert
def convert(
    src: PathLike,
    dst: PathLike,
    to: Format | str,
    *,
    part: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    base: PathLike | UNetBase | UNet2DConditionModel | None = None,
    settings: Mapping[str, Any] | None = None,
    ldm_config: PathLike | None = None,
) -> list[Path]:
    """Rewrite ``src`` in format ``to`` at ``dst``; returns the paths written. ``part`` picks
    'controlnet' or 'base' from a file that holds both (default: the ControlNet). A Control-LoRA
    is built on ``base`` (its UNet, the model the ControlNet is for) and written whole.
    ``settings``: a base model's generation settings, replacing those it carries (our format
    keeps them; the others have no place for them). ``ldm_config``: the original YAML of an
    original-layout ``src`` (for what its tensors do not tell, see :mod:`.infer`)."""
    d = detect(src)
    part = part or (CONTROLNET if CONTROLNET in d.kinds else BASE)
    if part not in d.kinds:
        raise CheckpointError(f"{src}: holds no {part} (it holds {' and '.join(d.kinds)})")
    if settings is not None and (part == CONTROLNET or Format(to) is not Format.CONTROLNET):
        raise ValueError("generation settings go with a base model written in our format (--to controlnet)")
    if base is not None and not d.control_lora:
        raise CheckpointError(f"{src}: a base model is given, but only a Control-LoRA is built on one")
    if part == CONTROLNET:
        unet = None if base is None else _unet_arg(base, dtype)
        return save_controlnet(
            load_controlnet(src, dtype=dtype, base_unet=unet, ldm_config=ldm_config),
            dst,
            to,
            overwrite=overwrite,
        )
    model = load_base(src, dtype=dtype, ldm_config=ldm_config)
    if settings is not None:
        model.settings = dict(settings)
    return save_base(model, dst, to, overwrite=overwrite)


# ------------------------------------------------------------------------------------ inspect
@dataclass
class Inspection:
    """What a checkpoint holds, read from names, shapes and configs (no weights loaded)."""

    path: Path
    format: Format
    layout: str
    family: str
    parameters: dict[str, int]  # part -> number of parameters
    dtypes: dict[str, int]  # dtype -> number of tensors
    controlnet: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: a Union ControlNet's control types (names, or numbers where its modes have none)
    control_types: list[str] | None = None
    #: part ('controlnet', 'base') -> None where its loader takes it, else the loader's refusal
    loads: dict[str, str | None] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return any(v is not None and "Control-LoRA" not in v for v in self.loads.values())

    def lines(self) -> list[str]:
        out = [
            f"file:       {self.path}",
            f"format:     {self.format.value} ({self.layout})",
            f"family:     {self.family}",
            "parts:",
            *(f"  {name:<36} {n / 1e6:>10.2f}M parameters" for name, n in self.parameters.items()),
            "dtypes:     " + ", ".join(f"{d} x{n}" for d, n in self.dtypes.items()),
        ]
        if self.controlnet:
            out.append("controlnet: " + ", ".join(f"{k}={v}" for k, v in self.controlnet.items()))
        if self.control_types:
            numbered_types = ", ".join(f"{i} {name}" for i, name in enumerate(self.control_types))
            out.append(f"types:      {numbered_types} (--control-type NAME or NUMBER)")
        out += [f"note:       {n}" for n in self.notes]
        for part, problem in self.loads.items():
            said = "loads (every key and shape checked)" if problem is None else problem
            out.append(f"check:      {part}: {said}")
        return out


def _count(tf: TensorFile, keys: list[str]) -> int:
    return sum(math.prod(tf.shapes[k]) for k in keys if tf.dtypes[k].is_floating_point)


def _dtypes(tfs: list[TensorFile]) -> dict[str, int]:
    c: Counter[str] = Counter(str(tf.dtypes[k]).removeprefix("torch.") for tf in tfs for k in tf)
    return dict(c.most_common())


def _options(unet_config: dict[str, Any], config: ControlNetConfig, residuals: int) -> dict[str, Any]:
    return {
        "hint_channels": config.hint_channels,
        "hint_block_channels": list(config.hint_block_channels),
        "global_pool": config.global_pool,
        "residuals": residuals,
        "in_channels": unet_config.get("in_channels"),
    }


def _family_label(tf: TensorFile, read: Callable[[], Family]) -> str:
    """The family our metadata records, else what ``read`` tells from the tensors, else unknown."""
    stored = tf.metadata.get("family")
    if stored:
        return Family(stored).label
    try:
        return read().label
    except CheckpointError:
        return "unknown"


def inspect_checkpoint(path: PathLike, *, ldm_config: PathLike | None = None) -> Inspection:
    """Describe a checkpoint file or folder: format, family, parts with parameter counts, dtypes,
    ControlNet options, notes on what loading leaves out, and what each loader says of it (every
    key and shape checked, no weights read). ``ldm_config``: an original-layout file's YAML."""
    ldm_config_fits(detect(path), ldm_config)
    found = _describe(path, ldm_config)
    found.loads = check_loads(path, ldm_config=ldm_config)
    if found.loads.get(CONTROLNET, "absent") is None:
        with shapes_only():
            found.control_types = control_type_choices(load_controlnet(path, ldm_config=ldm_config))
    return found


def _describe(path: PathLike, ldm_config: PathLike | None) -> Inspection:
    d = detect(path)
    tf = d.tensors
    if d.layout in (ADAPTER_FILE, ADAPTER_FOLDER):
        return _inspect_adapter(d)
    if d.family != "sd" and CONTROLNET in d.kinds:
        return _inspect_dit_controlnet(d)
    if d.family != "sd":
        return _inspect_dit_base(d)
    if d.format is Format.CONTROLNET:
        assert tf is not None
        if ours.CONTROLNET in d.kinds:
            arch = stored_controlnet_arch(tf)
            assert arch is not None
            residuals = len(numbered(tf.shapes, r"controlnet_down_blocks\.(\d+)\.weight")) + 1
            return Inspection(
                d.path,
                d.format,
                d.layout,
                Family(tf.metadata["family"]).label,
                {"controlnet": _count(tf, list(tf))},
                _dtypes([tf]),
                _options(*arch, residuals),
            )
        base_cfg = stored_base_config(tf)
        assert base_cfg is not None
        params = {p: _count(tf, tf.with_prefix(p + ".")) for p in ours.PARTS if tf.with_prefix(p + ".")}
        return Inspection(d.path, d.format, d.layout, base_cfg.family.label, params, _dtypes([tf]))
    if d.control_lora:
        assert tf is not None
        return _inspect_control_lora(d.path, d.layout, tf)
    if d.format is Format.ORIGINAL:
        assert tf is not None
        return _inspect_original(d.path, d.layout, tf, ldm_config)
    return _inspect_diffusers(d.path, d.layout, tf)


def _inspect_adapter(d: Detected) -> Inspection:
    """A T2I-Adapter: its kind and sizes as its loader reads them (shapes only)."""
    from .checkpoint import shapes_only

    with shapes_only():
        adapter = load_controlnet(d.path)
    tfs = [d.tensors] if d.tensors is not None else _weight_files(d.path)
    xl = adapter.config.adapter_type == "full_adapter_xl"
    params = {"t2i-adapter": sum(p.numel() for p in adapter.parameters())}
    options = adapter.config.to_dict() | {"features": adapter.num_residuals}
    family = "SDXL" if xl else "SD1.x / SD2.x"
    return Inspection(d.path, d.format, d.layout, family, params, _dtypes(tfs), options)


def _inspect_original(path: Path, layout: str, tf: TensorFile, ldm_config: PathLike | None) -> Inspection:
    params = {
        name: _count(tf, tf.with_prefix(prefix))
        for name, prefix in orig.PREFIXES.items()
        if tf.with_prefix(prefix)
    }
    notes = []
    for prefix, what in orig.IGNORED.items():
        if tf.with_prefix(prefix):
            notes.append(f"{prefix}*: {what}")
    schedule = [k for k in tf if k in orig.SCHEDULE_KEYS]
    if schedule:
        notes.append(f"{len(schedule)} schedule buffers: the betas give the noise schedule; not loaded")
    if tf.with_prefix(orig.TEXT_SD2):
        notes.append(
            "SD2.x text encoder: the last OpenCLIP layer and text_projection are not loaded (penultimate)"
        )
    yaml = None if ldm_config is None else Path(ldm_config)
    if tf.with_prefix(orig.UNET):
        family = _family_label(tf, lambda: orig.base_config(tf, ldm_config=yaml).family)
    else:
        family = _family_label(
            tf, lambda: family_of_unet_config(orig.controlnet_arch(tf, ldm_config=yaml)[0])
        )
    options = None
    if tf.with_prefix(orig.CONTROL):
        try:
            residuals = len(numbered(tf.shapes, r"control_model\.zero_convs\.(\d+)\.0\.weight")) + 1
            options = _options(*orig.controlnet_arch(tf, ldm_config=yaml), residuals)
        except CheckpointError as e:
            notes.append(f"ControlNet architecture not recognised: {e}")
    return Inspection(path, Format.ORIGINAL, layout, family, params, _dtypes([tf]), options, notes)


def _inspect_dit_controlnet(d: Detected) -> Inspection:
    spec = dit_controlnet.SPECS[d.family]
    tf = d.tensors if d.tensors is not None else dif.open_weights(d.path, dit_controlnet.WEIGHTS)
    notes: list[str] = []
    options = None
    try:
        arch = (
            dit_controlnet.arch(spec, tf)
            if d.tensors is not None
            else dit_controlnet.folder_arch(spec, d.path)
        )
        options = dit_controlnet.describe(spec, *arch)
    except CheckpointError as e:
        notes.append(f"ControlNet architecture not recognised: {e}")
    label = spec.label
    if options and options.get("guidance_input"):
        label = "Flux.1-dev"
    params = {"controlnet": _count(tf, list(tf))}
    return Inspection(d.path, d.format, d.layout, label, params, _dtypes([tf]), options, notes)


_PART_NAMES = {"model.diffusion_model.": "transformer", "first_stage_model.": "vae"}


def _part_of(key: str) -> str:
    """The part a key of a transformer family's single file belongs to (ours: its first name;
    Stability AI's: the reference prefixes)."""
    for prefix, name in _PART_NAMES.items():
        if key.startswith(prefix):
            return name
    head, _, rest = key.partition(".")
    return rest.partition(".")[0] if head == "text_encoders" else head


def _inspect_dit_base(d: Detected) -> Inspection:
    """A transformer family's base model, counted part by part (a folder: file by file)."""
    tfs = [d.tensors] if d.tensors is not None else _weight_files(d.path)
    params: dict[str, int] = {}
    if d.tensors is not None:
        parts: dict[str, list[str]] = {}
        for key in d.tensors:
            parts.setdefault(_part_of(key), []).append(key)
        params = {name: _count(d.tensors, keys) for name, keys in parts.items()}
    else:
        params = {str(tf.path.relative_to(d.path)): _count(tf, list(tf)) for tf in tfs}
    label = dit_controlnet.SPECS[d.family].label if d.family in dit_controlnet.SPECS else d.family
    label = {"sd3": "SD3 / SD3.5"}.get(d.family, label)
    return Inspection(d.path, d.format, d.layout, label, params, _dtypes(tfs))


def _weight_files(folder: Path) -> list[TensorFile]:
    from .checkpoint import open_tensors

    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors"))
    return [open_tensors(p) for p in files]


def _inspect_control_lora(path: Path, layout: str, tf: TensorFile) -> Inspection:
    try:
        family = clora.family_of(tf).label
    except CheckpointError:
        family = "unknown"
    layers = clora.low_rank_layers(tf)
    ranks = sorted({tf.shapes[down][0] for down, _ in layers.values()})
    residuals = len(numbered(tf.shapes, r"zero_convs\.(\d+)\.0\.weight")) + 1
    notes = [
        f"{len(layers)} layers as low-rank changes (rank {', '.join(map(str, ranks)) or '-'}) to the "
        "base UNet's weights; tensors the file lacks are the base UNet's: load it with its base model"
    ]
    options = None
    try:
        config = clora.hint_config(tf)
        options = {k: v for k, v in _options({}, config, residuals).items() if k != "in_channels"}
    except CheckpointError as e:
        notes.append(f"ControlNet architecture not recognised: {e}")
    params = {"controlnet (as stored)": _count(tf, [k for k in tf if k != clora.MARKER])}
    return Inspection(path, Format.ORIGINAL, layout, family, params, _dtypes([tf]), options, notes)


def _inspect_diffusers(path: Path, layout: str, tf: TensorFile | None) -> Inspection:
    if tf is not None:  # bare diffusers-layout ControlNet weights
        residuals = len(numbered(tf.shapes, r"controlnet_down_blocks\.(\d+)\.weight")) + 1
        notes = []
        try:
            options = _options(*dif.file_controlnet_arch(tf), residuals)
        except CheckpointError as e:
            options, notes = None, [f"ControlNet architecture not recognised: {e}"]
        params = {"controlnet": _count(tf, list(tf))}
        family = _family_label(tf, lambda: family_of_unet_config(dif.file_controlnet_arch(tf)[0]))
        return Inspection(path, Format.DIFFUSERS, layout, family, params, _dtypes([tf]), options, notes)
    if dif.is_controlnet_folder(path):
        unet_config, config = dif.controlnet_arch(read_json(path / "config.json"))
        weights = dif.open_weights(path, dif.WEIGHTS)
        residuals = len(numbered(weights.shapes, r"controlnet_down_blocks\.(\d+)\.weight")) + 1
        return Inspection(
            path,
            Format.DIFFUSERS,
            layout,
            family_of_unet_config(unet_config).label,
            {"controlnet": _count(weights, list(weights))},
            _dtypes([weights]),
            _options(unet_config, config, residuals),
        )
    cfg = dif.base_config(path)
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if cfg.text_encoder_2 else [])
    tfs = {
        p: dif.open_weights(path / p, dif.TEXT_WEIGHTS if p.startswith("text_encoder") else dif.WEIGHTS)
        for p in parts
    }
    params = {p: _count(t, list(t)) for p, t in tfs.items()}
    return Inspection(path, Format.DIFFUSERS, layout, cfg.family.label, params, _dtypes(list(tfs.values())))
