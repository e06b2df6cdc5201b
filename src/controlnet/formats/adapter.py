"""T2I-Adapter files: TencentARC's original layout (``t2iadapter_*_sd14v1.pth`` and the like) and a
single file of diffusers' keys. The architecture is read off the tensors.

The original full adapter numbers its resnets through the levels (``body.{level * n + j}.block1``;
the first resnet of a level that widens holds the 1x1 ``in_conv``); the light adapter nests them
(``body.{level}.body.{j}``, with ``in_conv`` and ``out_conv`` per level). Our module holds diffusers'
names (``adapter.body.{level}.resnets.{j}``); the rules below map one to the other, key for key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..families.sd.adapter import AdapterConfig, T2IAdapter
from .checkpoint import CheckpointError, TensorFile, atomic_outputs, dump_json, save_safetensors
from .keymap import Rule, identity_rules, load_into, to_file

__all__ = ["file_format", "is_adapter_file", "load_adapter_file", "save_adapter"]

PREFIX = "adapter."
#: our single file's metadata key: the adapter's config as JSON (a light adapter's needs it)
META_CONFIG = "t2i_adapter_config"


def _kind(tf: TensorFile) -> str | None:
    """'full' / 'light' (TencentARC's layout), 'diffusers' (a single file of diffusers' keys), None."""
    if "conv_in.weight" in tf and "body.0.block1.weight" in tf:
        return "full"
    if "body.0.in_conv.weight" in tf and "body.0.body.0.block1.weight" in tf and "conv_in.weight" not in tf:
        return "light"
    if "adapter.body.0.resnets.0.block1.weight" in tf:
        return "diffusers"
    return None


def is_adapter_file(tf: TensorFile) -> bool:
    return _kind(tf) is not None


def file_format(tf: TensorFile) -> str:
    """The format value of an adapter file: 'original' (TencentARC's keys), 'controlnet' (ours:
    diffusers' keys with the config in the metadata) or 'diffusers' (its keys alone)."""
    if _kind(tf) in ("full", "light"):
        return "original"
    return "controlnet" if META_CONFIG in tf.metadata else "diffusers"


def _shape(tf: TensorFile, key: str) -> tuple[int, ...]:
    if key not in tf:
        raise CheckpointError(f"{tf.path}: a T2I-Adapter file without {key!r}")
    return tuple(tf.shapes[key])


def _original_full(tf: TensorFile) -> tuple[AdapterConfig, list[Rule]]:
    bodies = sorted({int(m.group(1)) for k in tf if (m := re.match(r"body\.(\d+)\.", k))})
    if not bodies or bodies != list(range(len(bodies))):
        raise CheckpointError(f"{tf.path}: T2I-Adapter resnets body.N are not numbered 0..N-1")
    widening = [i for i in bodies if f"body.{i}.in_conv.weight" in tf]
    per_level = widening[0] if widening else len(bodies)  # the first widening resnet opens level 1
    if per_level == 0 or len(bodies) % per_level:
        raise CheckpointError(f"{tf.path}: {len(bodies)} resnets do not split into levels of {per_level}")
    levels = len(bodies) // per_level
    channels = [_shape(tf, f"body.{lv * per_level}.block1.weight")[0] for lv in range(levels)]
    first = _shape(tf, "conv_in.weight")
    config = AdapterConfig(
        in_channels=first[1] // 64, channels=channels, num_res_blocks=per_level, downscale_factor=8
    )
    rules = [Rule(f"{PREFIX}conv_in.{p}", f"conv_in.{p}") for p in ("weight", "bias")]
    for lv in range(levels):
        for j in range(per_level):
            src = f"body.{lv * per_level + j}"
            for part in ("block1", "block2"):
                rules += [
                    Rule(f"{PREFIX}body.{lv}.resnets.{j}.{part}.{p}", f"{src}.{part}.{p}")
                    for p in ("weight", "bias")
                ]
            if j == 0 and f"{src}.in_conv.weight" in tf:
                rules += [
                    Rule(f"{PREFIX}body.{lv}.in_conv.{p}", f"{src}.in_conv.{p}") for p in ("weight", "bias")
                ]
    return config, rules


def _original_light(tf: TensorFile) -> tuple[AdapterConfig, list[Rule]]:
    levels = sorted({int(m.group(1)) for k in tf if (m := re.match(r"body\.(\d+)\.in_conv\.", k))})
    per_level = len({m.group(1) for k in tf if (m := re.match(r"body\.0\.body\.(\d+)\.", k))})
    channels = [_shape(tf, f"body.{lv}.out_conv.weight")[0] for lv in levels]
    config = AdapterConfig(
        in_channels=_shape(tf, "body.0.in_conv.weight")[1] // 64,
        channels=channels[:-1],  # the last level repeats the width before it
        num_res_blocks=per_level,
        downscale_factor=8,
        adapter_type="light_adapter",
    )
    rules = []
    for lv in levels:
        for conv in ("in_conv", "out_conv"):
            rules += [
                Rule(f"{PREFIX}body.{lv}.{conv}.{p}", f"body.{lv}.{conv}.{p}") for p in ("weight", "bias")
            ]
        for j in range(per_level):
            for part in ("block1", "block2"):
                rules += [
                    Rule(f"{PREFIX}body.{lv}.resnets.{j}.{part}.{p}", f"body.{lv}.body.{j}.{part}.{p}")
                    for p in ("weight", "bias")
                ]
    return config, rules


def _diffusers_file(tf: TensorFile) -> AdapterConfig:
    stored = tf.metadata.get(META_CONFIG)
    if stored is not None:  # ours: the config as written
        try:
            return AdapterConfig.from_dict(json.loads(stored))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{tf.path}: bad {META_CONFIG} in the metadata ({e})") from e
    return _config_off_tensors(tf)


def _config_off_tensors(tf: TensorFile) -> AdapterConfig:
    """A single file of diffusers' keys, without its config: the full (SD1/SD2) or SDXL kind by
    its first layer's input (8x8 or 16x16 pixels unshuffled), the widths and counts off the tensors."""
    levels = sorted({int(m.group(1)) for k in tf if (m := re.match(r"adapter\.body\.(\d+)\.", k))})
    per_level = len({m.group(1) for k in tf if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k))})
    if any(re.match(r"adapter\.body\.\d+\.out_conv\.", k) for k in tf):
        raise CheckpointError(f"{tf.path}: a light T2I-Adapter needs its config.json (use the folder)")
    channels = [_shape(tf, f"adapter.body.{lv}.resnets.0.block1.weight")[0] for lv in levels]
    cin = _shape(tf, "adapter.conv_in.weight")[1]
    # the pixels unshuffled into channels: 8x8 of RGB or gray (SD1/SD2), 16x16 (SDXL)
    xl = cin in (256, 768)
    factor = 16 if xl else 8
    return AdapterConfig(
        in_channels=cin // factor**2,
        channels=channels,
        num_res_blocks=per_level,
        downscale_factor=factor,
        adapter_type="full_adapter_xl" if xl else "full_adapter",
    )


def load_adapter_file(tf: TensorFile, *, dtype: torch.dtype | None = None) -> T2IAdapter:
    """A T2I-Adapter from one file (TencentARC's layout or diffusers' keys), key for key."""
    kind = _kind(tf)
    if kind == "full":
        config, rules = _original_full(tf)
    elif kind == "light":
        config, rules = _original_light(tf)
    elif kind == "diffusers":
        config, rules = _diffusers_file(tf), []
    else:
        raise CheckpointError(f"{tf.path}: not a T2I-Adapter file")
    with torch.device("meta"):
        adapter = T2IAdapter(config)
    if kind == "diffusers":
        return load_into(adapter, tf, identity_rules, present=tf.keys(), what="T2I-Adapter", dtype=dtype)
    by_ours = {r.ours: r for r in rules}

    def rules_for(keys: list[str]) -> list[Rule]:
        missing = [k for k in keys if k not in by_ours]
        if missing:
            raise CheckpointError(f"{tf.path}: T2I-Adapter keys with no place in the file: {missing[:5]}")
        return [by_ours[k] for k in keys]

    return load_into(adapter, tf, rules_for, present=tf.keys(), what="T2I-Adapter", dtype=dtype)


def _original_rules(adapter: T2IAdapter) -> list[Rule]:
    """Our keys -> TencentARC's, for writing (the inverse of what loading reads)."""
    c = adapter.config
    if c.adapter_type == "full_adapter_xl":
        raise CheckpointError(
            "an SDXL T2I-Adapter has no original layout (TencentARC released them as diffusers folders); "
            "write it --to diffusers or --to controlnet"
        )
    rules = []
    for key in adapter.state_dict():
        k = key.removeprefix(PREFIX)
        if c.adapter_type == "light_adapter":
            k = re.sub(r"body\.(\d+)\.resnets\.", r"body.\1.body.", k)
        elif (m := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", k)) is not None:
            k = f"body.{int(m.group(1)) * c.num_res_blocks + int(m.group(2))}.{m.group(3)}"
        elif (m := re.match(r"body\.(\d+)\.in_conv\.(.*)", k)) is not None:
            k = f"body.{int(m.group(1)) * c.num_res_blocks}.in_conv.{m.group(2)}"
        rules.append(Rule(key, k))
    return rules


def save_adapter(adapter: T2IAdapter, path: Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Write ``adapter`` atomically: ``diffusers`` (a T2IAdapter folder), ``original``
    (TencentARC's keys, one safetensors file) or ``controlnet`` (ours: diffusers' keys and the config
    in the metadata, one file)."""
    import diffusers

    state = adapter.state_dict()
    if fmt == "diffusers":
        config = {"_class_name": "T2IAdapter", "_diffusers_version": diffusers.__version__}
        config.update(adapter.config.to_dict())
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            tmp.mkdir()
            (tmp / "config.json").write_text(dump_json(config))
            save_safetensors(state, tmp / "diffusion_pytorch_model.safetensors", {"format": "pt"})
        return [path]
    if fmt == "original":
        tensors = to_file(state, _original_rules(adapter))
        with atomic_outputs(path, overwrite=overwrite) as (tmp,):
            save_safetensors(tensors, tmp, {"format": "pt"})
        return [path]
    metadata = {"format": "pt", META_CONFIG: json.dumps(adapter.config.to_dict())}
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        save_safetensors(state, tmp, metadata)
    return [path]
