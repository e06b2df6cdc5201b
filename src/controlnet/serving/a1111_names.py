"""The A1111 web UI's names for what we serve: its samplers and schedule types, the ControlNet
extension's modules (where one of our annotators is the same thing), its resize and control
modes, and how a unit names a ControlNet. Each reader raises a ValueError naming the web UI's
field and listing what is served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..choices import ControlMode, ResizeMode, Sampler, TimestepSpacing

__all__ = [
    "CONTROL_MODES",
    "MODULES",
    "RESIZE",
    "SAMPLERS",
    "SCHEDULES",
    "Module",
    "control_mode_of",
    "module_of",
    "module_params",
    "number",
    "resize_mode_of",
    "sampler_of",
    "served_modules",
    "unit_model",
]


#: the web UI's samplers we serve: name -> (our sampler, its schedule type when "Automatic")
SAMPLERS: dict[str, tuple[Sampler, str]] = {
    "DPM++ 2M": (Sampler.DPMPP_2M, "karras"),
    "DPM++ 2M SDE": (Sampler.DPMPP_2M_SDE_KARRAS, "karras"),
    "Euler a": (Sampler.EULER_A, "normal"),
    "Euler": (Sampler.EULER, "normal"),
    "DDIM": (Sampler.DDIM, "normal"),
    "UniPC": (Sampler.UNIPC, "normal"),
    "LCM": (Sampler.LCM, "normal"),
}
#: the web UI's schedule types we serve (its names and labels), and the samplers each fits
SCHEDULES: dict[str, str] = {
    "automatic": "Automatic",
    "normal": "Normal",
    "uniform": "Uniform",
    "karras": "Karras",
    "sgm_uniform": "SGM Uniform",
}
_KARRAS = {
    Sampler.DPMPP_2M: Sampler.DPMPP_2M_KARRAS,
    Sampler.DPMPP_2M_SDE_KARRAS: Sampler.DPMPP_2M_SDE_KARRAS,
}


def sampler_of(name: str | None, schedule: str | None) -> tuple[Sampler, TimestepSpacing]:
    """Our sampler and timestep spacing for the web UI's ``sampler_name`` and ``scheduler``
    (older names carry " Karras" in the sampler's name)."""
    name = (name or "Euler a").strip()
    schedule = (schedule or "automatic").strip().lower().replace(" ", "_")
    if name.endswith(" Karras"):
        name, schedule = name.removesuffix(" Karras"), "karras" if schedule == "automatic" else schedule
    by_lower = {k.lower(): k for k in SAMPLERS}
    if name.lower() not in by_lower:
        raise ValueError(f"sampler_name: {name!r} is not served; this server has: {', '.join(SAMPLERS)}")
    ours, automatic = SAMPLERS[by_lower[name.lower()]]
    labels = {v.lower().replace(" ", "_"): k for k, v in SCHEDULES.items()}
    schedule = labels.get(schedule, schedule)
    if schedule not in SCHEDULES:
        raise ValueError(
            f"scheduler: {schedule!r} is not served; this server has: {', '.join(SCHEDULES.values())}"
        )
    if schedule == "automatic":
        schedule = automatic
    if schedule == "karras":
        if ours not in _KARRAS:
            raise ValueError(f"scheduler: Karras is served with DPM++ 2M and DPM++ 2M SDE, not {name}")
        return _KARRAS[ours], TimestepSpacing.DEFAULT
    if ours is Sampler.DPMPP_2M_SDE_KARRAS:
        raise ValueError(f"scheduler: DPM++ 2M SDE is served with the Karras schedule only, not {schedule!r}")
    if schedule == "sgm_uniform":
        if ours in (Sampler.LCM, Sampler.DDIM):
            raise ValueError(f"scheduler: SGM Uniform is not served with {name}")
        return ours, TimestepSpacing.TRAILING
    return ours, TimestepSpacing.DEFAULT  # normal / uniform: the sampler's own spacing


# ---------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class Module:
    """One of the extension's modules that one of our annotators is: the annotator, fixed
    parameters, and which of the unit's sliders (threshold_a / threshold_b) set which parameter,
    with the extension's defaults and ranges (a slider left at -1 or outside them takes the default)."""

    annotator: str | None  # None: the image is the condition map itself
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    a: tuple[str, float, float, float] | None = None  # (our parameter, default, minimum, maximum)
    b: tuple[str, float, float, float] | None = None
    aliases: tuple[str, ...] = ()


#: the extension's module names (as its menu shows them) that our annotators serve
MODULES: dict[str, Module] = {
    "none": Module(None),
    "invert": Module("invert", aliases=("invert (from white bg & black line)",)),
    "canny": Module("canny", a=("low_threshold", 100, 1, 255), b=("high_threshold", 200, 1, 255)),
    "threshold": Module("binary", a=("threshold", 127, 0, 254), aliases=("binary",)),
    "depth_midas": Module("depth_midas", aliases=("depth",)),
    "depth_anything": Module("depth_anything"),
    "normal_midas": Module("normal_midas", a=("bg_threshold", 0.4, 0.0, 1.0), aliases=("normal_map",)),
    "openpose": Module("openpose"),
    "softedge_hed": Module("hed", aliases=("hed",)),
    "softedge_hedsafe": Module("hed", {"safe": True}, aliases=("hed_safe",)),
    "scribble_hed": Module("scribble_hed"),
    "lineart_standard": Module("lineart", aliases=("lineart_standard (from white bg & black line)",)),
    "seg_ufade20k": Module("segmentation", aliases=("segmentation",)),
    "shuffle": Module("shuffle"),
    "tile_resample": Module("tile", a=("downsample", 1.0, 1.0, 8.0)),
    "t2ia_color_grid": Module("color", aliases=("color",)),
    "inpaint_global_harmonious": Module("inpaint", aliases=("inpaint",)),
}
_BY_NAME = {n.lower(): (n, m) for n, m in MODULES.items()} | {
    a.lower(): (n, m) for n, m in MODULES.items() for a in m.aliases
}


def served_modules(offered_weights: Mapping[str, Any]) -> list[str]:
    """The modules this server can run: those whose annotator needs no weights, or needs weights
    it offers under the annotator's default name."""
    from .. import annotators as A

    out = []
    for name, m in MODULES.items():
        if m.annotator is not None:
            ann = A.get(m.annotator)
            if ann.needs_weights and ann.defaults.get("weights") not in offered_weights:
                continue
        out.append(name)
    return out


def module_of(name: Any, field: str, served: list[str]) -> tuple[str, Module]:
    """The served module ``name`` names (by its name or an alias, any case); ValueError naming ``field``."""
    found = _BY_NAME.get(name.strip().lower()) if isinstance(name, str) else None
    if found is None or found[0] not in served:
        raise ValueError(f"{field}: {name!r} is not served; this server has: {', '.join(served)}")
    return found


def module_params(module: Module, threshold_a: float, threshold_b: float) -> dict[str, Any]:
    """Our annotator's parameters from a unit's sliders (the extension's defaults where a slider is
    -1 or out of its range)."""
    params = dict(module.fixed)
    for slider, value in ((module.a, threshold_a), (module.b, threshold_b)):
        if slider is None:
            continue
        name, default, low, high = slider
        v = default if value is None or not low <= value <= high else value
        params[name] = round(v) if isinstance(default, int) else float(v)
    return params


def unit_model(name: str | None, controlnets: list[str], where: str) -> str:
    """The served ControlNet a unit's ``model`` names: by name, ignoring case and a " [hash]"."""
    wanted = (name or "").split(" [")[0].strip().lower()
    for served in controlnets:
        if served.lower() == wanted:
            return served
    raise ValueError(
        f"{where}.model: {name!r} is not served; this server has: {', '.join(controlnets)} "
        "(GET /controlnet/model_list)"
    )


#: the extension's resize modes and control modes, by name (and by index)
RESIZE = {
    "just resize": ResizeMode.STRETCH,
    "crop and resize": ResizeMode.CROP,
    "resize and fill": ResizeMode.FILL,
    "inner fit (scale to fit)": ResizeMode.CROP,
    "scale to fit (inner fit)": ResizeMode.CROP,
    "outer fit (shrink to fit)": ResizeMode.FILL,
    "envelope (outer fit)": ResizeMode.FILL,
}
_RESIZE_BY_INDEX = [ResizeMode.STRETCH, ResizeMode.CROP, ResizeMode.FILL]
CONTROL_MODES = {
    "balanced": ControlMode.BALANCED,
    "my prompt is more important": ControlMode.PROMPT,
    "controlnet is more important": ControlMode.CONTROLNET,
}


def resize_mode_of(value: Any, where: str) -> ResizeMode:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: expected a resize mode's name or number, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(_RESIZE_BY_INDEX):
            raise ValueError(
                f"{where}: {value} is not served (0 Just Resize, 1 Crop and Resize, 2 Resize and Fill)"
            )
        return _RESIZE_BY_INDEX[value]
    if value.strip().lower() not in RESIZE:
        raise ValueError(
            f"{where}: {value!r} is not served; expected Just Resize, Crop and Resize or Resize and Fill"
        )
    return RESIZE[value.strip().lower()]


def control_mode_of(value: Any, where: str) -> ControlMode:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2:
        return list(CONTROL_MODES.values())[value]
    if isinstance(value, str) and value.strip().lower() in CONTROL_MODES:
        return CONTROL_MODES[value.strip().lower()]
    raise ValueError(
        f"{where}: {value!r} is not a control mode; expected Balanced, My prompt is more important or "
        "ControlNet is more important (or 0, 1, 2)"
    )


def number(p: Mapping[str, Any], name: str, default: Any, kind: type = float) -> Any:
    """``p[name]`` as a finite number of ``kind`` (``default`` when absent or null); ValueError
    naming the field otherwise."""
    value = p.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or abs(value) == float("inf")
    ):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    return kind(value)
