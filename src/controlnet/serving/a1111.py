"""The A1111 web UI's API, read into ours: its txt2img / img2img payloads with the ControlNet
extension's units become our generation request, and our output becomes its answer.

What is served is what the two share: the names of the web UI's samplers and schedule types,
the extension's modules (annotators) where ours are the same thing, its units' fields, defaults
and spellings ("Crop and Resize", "My prompt is more important"). A payload is turned into a body
of our own API (:func:`translate`), so the same job sent either way gives the same images; a
value we do not serve is a ValueError naming the web UI's field, and a field the web UI knows
whose value changes nothing here is accepted. Fields the web UI does not know are ignored, as
the web UI ignores them (the routes log them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..choices import ResizeMode, Sampler
from .a1111_names import (
    SCHEDULES,
    control_mode_of,
    module_of,
    module_params,
    number,
    resize_mode_of,
    sampler_of,
    unit_model,
)
from .codec import encode_png

__all__ = ["Server", "Translation", "answer", "fill_masked", "infotext", "translate"]

#: fields of the web UI's payloads that change nothing here at these values (any other value is
#: refused, naming the field); the web UI's client libraries send them all
INERT: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(
        ("styles", "subseed_strength", "restore_faces", "tiling", "s_churn", "s_tmin", "s_tmax",
         "script_name", "refiner_checkpoint", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler",
         "hr_prompt", "hr_negative_prompt"),
        lambda v: not v,
    ),
    **dict.fromkeys(("s_noise", "initial_noise_multiplier"), lambda v: v in (None, 1, 1.0)),
    "image_cfg_scale": lambda v: True,  # instruct-pix2pix models only
}  # fmt: skip
#: fields the web UI knows that only decide what it saves or shows: accepted, whatever their value
ACCEPTED = {
    "subseed", "seed_resize_from_h", "seed_resize_from_w", "do_not_save_samples", "do_not_save_grid",
    "override_settings_restore_afterwards", "save_images", "send_images", "sampler_index", "comments",
    "disable_extra_networks", "force_task_id", "infotext", "script_args", "firstphase_width",
    "firstphase_height", "include_init_images", "inpaint_full_res_padding", "s_min_uncond", "mask_round",
    "latent_mask", "mask_blur_x", "mask_blur_y", "refiner_switch_at", "use_async", "hr_additional_modules",
}  # fmt: skip
KNOWN = {
    *INERT, *ACCEPTED, "prompt", "negative_prompt", "seed", "sampler_name", "scheduler", "batch_size",
    "n_iter", "steps", "cfg_scale", "distilled_cfg_scale", "width", "height", "eta", "denoising_strength",
    "override_settings", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
    "hr_resize_y", "alwayson_scripts", "init_images", "resize_mode", "mask", "mask_blur", "inpainting_fill",
    "inpaint_full_res", "inpainting_mask_invert",
}  # fmt: skip


@dataclass
class Server:
    """What a translation needs of the server: its ControlNets' names, the modules it can run,
    the defaults its options set, and how to run an annotator and read an upload."""

    controlnets: list[str]
    modules: list[str]
    model_name: str
    options: dict[str, Any]
    detect: Callable[..., np.ndarray]  # (annotator, image bytes, params, mask bytes|None, resolution) -> map
    read: Callable[[bytes, str], np.ndarray]  # (image bytes, field) -> (H, W, 3|4) uint8
    decode: Callable[[Any, str], bytes]  # (base64 text, field) -> bytes


@dataclass
class Translation:
    """A web UI payload read: our API's generate body, the payload's fields the web UI does not
    know (ignored), and the controls whose detected maps the answer sends back."""

    body: dict[str, Any]
    ignored: list[str]
    detected: list[int]


def translate(payload: Mapping[str, Any], server: Server, *, img2img: bool) -> Translation:
    """Our API's generate body for a web UI txt2img (or ``img2img``) payload."""
    p = dict(payload)
    ignored = sorted(k for k in p if k not in KNOWN)
    for name, inert in INERT.items():
        if name in p and not inert(p[name]):
            raise ValueError(f"{name}: {p[name]!r} is not served (only its default)")
    settings = dict(server.options)
    overrides = p.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("override_settings: expected an object of option names and values")
    for key, value in overrides.items():
        settings[key] = value
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint and checkpoint.split(" [")[0] != server.model_name:
        raise ValueError(
            f"override_settings.sd_model_checkpoint: {checkpoint!r} is not served; this server has "
            f"{server.model_name!r} (GET /sdapi/v1/sd-models)"
        )
    sampler, spacing = sampler_of(p.get("sampler_name") or p.get("sampler_index"), p.get("scheduler"))
    eta = p.get("eta")
    if sampler is Sampler.EULER_A and eta not in (None, 1, 1.0):
        raise ValueError(f"eta: Euler a is served with its full ancestral noise (eta 1), not {eta}")
    batch, n_iter = number(p, "batch_size", 1, int), number(p, "n_iter", 1, int)
    seed = number(p, "seed", -1, int)
    body: dict[str, Any] = {
        "prompt": p.get("prompt") or "",
        "negative_prompt": p.get("negative_prompt") or "",
        "prompt_setting": "user",
        "added_prompt": "",
        "prompt_syntax": "weighted",
        "clip_skip": number(settings, "CLIP_stop_at_last_layers", 1, int),
        "sampler": sampler.value,
        "timestep_spacing": spacing.value,
        "steps": number(p, "steps", 20, int),
        "guidance": number(p, "cfg_scale", 7.0),
        "seed": None if seed < 0 else seed,
        "num_samples": batch * n_iter,
        "width": number(p, "width", 512, int),
        "height": number(p, "height", 512, int),
        "vae_tiling": False,
    }
    if sampler is Sampler.DDIM and eta is not None:
        body["eta"] = number(p, "eta", 0.0)
    if p.get("distilled_cfg_scale") is not None:  # Forge's field for guidance-distilled models
        body["guidance"] = number(p, "distilled_cfg_scale", 3.5)
        body["true_guidance"] = number(p, "cfg_scale", 1.0)
    init, init_hw = None, None
    if img2img:
        images = p.get("init_images") or []
        if len(images) != 1:
            raise ValueError(f"init_images: one image is served, got {len(images)}")
        init = server.decode(images[0], "init_images[0]")
        init_pixels = server.read(init, "init_images[0]")
        init_hw = init_pixels.shape[:2]
        body["resize_mode"] = resize_mode_of(p.get("resize_mode", 0), "resize_mode").value
        body["denoise"] = number(p, "denoising_strength", 0.75)
        if p.get("mask"):
            body["init_image"], body["mask"] = _mask(p, server, init_pixels)
            body["mask_blur"], body["overlay"] = number(p, "mask_blur", 4, int), True
        else:
            body["init_image"] = encode_png(init_pixels)
    elif p.get("enable_hr"):
        body.update(_hires(p, body))
    body["controls"], detected = _units(p, server, body, init, init_hw)
    return Translation(body, ignored, detected)


def _mask(p: Mapping[str, Any], server: Server, image: np.ndarray) -> tuple[Any, str]:
    """The init image (masked content filled when asked) and the img2img mask (inverted when
    asked), each as base64 PNG. The web UI's defaults hold where a field is absent: "Only masked"
    (which is not served: a client sends false) and "fill"."""
    if p.get("inpaint_full_res", True):
        raise ValueError(
            "inpaint_full_res: 'Only masked' (the web UI's default) is not served; send false "
            "(inpaint the whole picture)"
        )
    fill = p.get("inpainting_fill", 0)
    if fill not in (0, 1):
        raise ValueError(f"inpainting_fill: {fill!r} is not served (0 fill, 1 original)")
    mask = server.read(server.decode(p["mask"], "mask"), "mask")
    white = (mask[..., :3].max(axis=-1) if mask.ndim == 3 else mask) > 127
    if mask.ndim == 3 and mask.shape[2] == 4:  # transparency, where given, is what is kept
        white &= mask[..., 3] > 127
    if p.get("inpainting_mask_invert"):
        white = ~white
    if image.shape[:2] != white.shape:
        raise ValueError(
            f"mask: {white.shape[1]}x{white.shape[0]} but the init image is {image.shape[1]}x{image.shape[0]}"
        )
    if fill == 0:
        image = fill_masked(image[..., :3], white)
    return encode_png(image), encode_png(white.astype(np.uint8) * 255)


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with its masked pixels (``mask`` True) replaced by the colours around them, spread
    inward by blurs from coarse to fine: the web UI's "fill" masked content."""
    import cv2

    known = (~mask).astype(np.float32)
    colour = image.astype(np.float32) * known[..., None]
    out = image.astype(np.float32)
    filled = np.zeros_like(out)
    for sigma in (256, 64, 16, 4, 2):
        weight = cv2.GaussianBlur(known, (0, 0), sigma)
        spread = cv2.GaussianBlur(colour, (0, 0), sigma) / np.maximum(weight, 1e-6)[..., None]
        filled = np.where((weight > 1e-3)[..., None], spread, filled)
    out[mask] = filled[mask]
    return out.round().clip(0, 255).astype(np.uint8)


def _hires(p: Mapping[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    upscaler = p.get("hr_upscaler") or "Latent"
    if upscaler != "Latent":
        raise ValueError(f"hr_upscaler: {upscaler!r} is not served; this server has: Latent")
    scale = number(p, "hr_scale", 2.0)
    rx, ry = number(p, "hr_resize_x", 0, int), number(p, "hr_resize_y", 0, int)
    if rx or ry:
        sx, sy = rx / body["width"] if rx else None, ry / body["height"] if ry else None
        if sx and sy and abs(sx - sy) > 1e-6:
            raise ValueError("hr_resize_x / hr_resize_y: a hires size of another aspect is not served")
        scale = sx or sy  # type: ignore[assignment]
    second = number(p, "hr_second_pass_steps", 0, int)
    return {
        "hires_scale": scale,
        "hires_denoise": number(p, "denoising_strength", 0.7),
        "hires_steps": second or None,
        "hires_upscaler": "latent",
    }


def _unit_images(unit: Mapping[str, Any], server: Server, where: str) -> tuple[bytes | None, bytes | None]:
    """A unit's image and mask, in each spelling the extension reads."""
    image, mask = unit.get("image", unit.get("input_image")), unit.get("mask", unit.get("mask_image"))
    if isinstance(image, Mapping):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)):
        image, mask = [*list(image), None, None][:2]
    read = lambda v, w: server.decode(v, w) if v else None  # noqa: E731
    return read(image, f"{where}.image"), read(mask, f"{where}.mask")


def _units(
    p: Mapping[str, Any],
    server: Server,
    body: dict[str, Any],
    init: bytes | None,
    init_hw: tuple[int, int] | None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Our controls for the enabled ControlNet units, and which of them ran an annotator
    (``init``: img2img's image, read by units without one; ``init_hw``: its size)."""
    scripts = p.get("alwayson_scripts") or {}
    if not isinstance(scripts, Mapping) or not all(isinstance(v, Mapping | None) for v in scripts.values()):
        raise ValueError('alwayson_scripts: expected an object of scripts, each {"args": [...]}')
    found = [k for k in scripts if k.lower() == "controlnet"]
    others = [
        k
        for k in scripts
        if k.lower() != "controlnet" and (scripts[k] or {}).get("args") not in ([], [False])
    ]
    if others:
        raise ValueError(f"alwayson_scripts: {', '.join(others)} is not served (ControlNet is)")
    args = (scripts[found[0]] or {}).get("args", []) if found else []
    if not isinstance(args, list):
        raise ValueError(f"alwayson_scripts.{found[0]}.args: expected a list of ControlNet units")
    units, modes, detected = [], [], []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.{found[0]}.args[{i}]"
        if not isinstance(unit, Mapping):
            raise ValueError(f"{where}: expected a ControlNet unit (an object)")
        if not unit.get("enabled", False):
            continue
        _, module = module_of(unit.get("module", "none"), f"{where}.module", server.modules)
        image, mask = _unit_images(unit, server, where)
        if image is None:  # in img2img, the init image
            if init is None:
                raise ValueError(f"{where}.image: a unit needs an image in txt2img")
            image = init
        pixels = server.read(image, f"{where}.image")
        for field, fits in (
            ("advanced_weighting", lambda v: v is None),
            ("ipadapter_input", lambda v: v is None),
        ):
            if not fits(unit.get(field)):
                raise ValueError(f"{where}.{field}: not served")
        if body.get("hires_scale") and unit.get("hr_option", "Both") not in ("Both", 0):
            raise ValueError(f"{where}.hr_option: {unit['hr_option']!r} is not served (Both)")
        start, end = number(unit, "guidance_start", 0.0), number(unit, "guidance_end", 1.0)
        control: dict[str, Any] = {
            "controlnet": unit_model(unit.get("model"), server.controlnets, where),
            "strength": number(unit, "weight", 1.0),
            "start": start,
            "end": end,
            "mode": control_mode_of(unit.get("control_mode", 0), f"{where}.control_mode").value,
        }
        kind = unit.get("union_control_type")
        if kind not in (None, "", "Unknown"):
            control["control_type"] = str(kind).strip().lower().replace(" ", "")
        region = unit.get("effective_region_mask")
        if region:
            what = f"{where}.effective_region_mask"
            control["region_mask"] = encode_png(server.read(server.decode(region, what), what))
        params = module_params(module, number(unit, "threshold_a", -1.0), number(unit, "threshold_b", -1.0))
        res = number(unit, "processor_res", -1, int)
        pixel_perfect = bool(unit.get("pixel_perfect", False))
        if module.annotator is None:
            control["image"] = encode_png(pixels)
        elif pixel_perfect and mask is None:  # detected at the size the image takes in the output
            control.update(image=encode_png(pixels), preprocess=module.annotator, params=params)
        else:  # detected at the unit's processor resolution (the extension's default: 512)
            res = res if 64 <= res <= 2048 else 512
            at = None if pixel_perfect else res
            control["image"] = encode_png(server.detect(module.annotator, image, params, mask, at, where))
        if module.annotator is not None and unit.get("save_detected_map", True):
            detected.append(len(units))
        units.append(control)
        mode = resize_mode_of(unit.get("resize_mode", "Crop and Resize"), f"{where}.resize_mode")
        modes.append((mode, f"{where}.resize_mode", pixels.shape[:2]))
    _one_resize_mode(body, modes, init_hw)
    return units, detected


def _one_resize_mode(
    body: dict[str, Any],
    modes: list[tuple[ResizeMode, str, tuple[int, int]]],
    init_hw: tuple[int, int] | None,
) -> None:
    """Our requests fit every image one way. A mode matters only for an image of another aspect
    than the output (of the same aspect, each mode is the same resize): the modes that matter
    (the units', and img2img's) must agree."""
    out_hw = (body["height"], body["width"])
    entries = [*modes]
    if init_hw is not None:
        entries.append((ResizeMode(body["resize_mode"]), "resize_mode", init_hw))
    matter = [(m, w) for m, w, hw in entries if hw[0] * out_hw[1] != hw[1] * out_hw[0]]
    if len({m for m, _ in matter}) > 1:
        names = ", ".join(f"{w} {m.value}" for m, w in matter)
        raise ValueError(f"this server fits every image of another aspect one way; got {names}")
    chosen = matter[0][0] if matter else entries[-1][0] if init_hw is not None else None
    if chosen is None and entries:
        chosen = entries[0][0]
    if chosen is not None:
        body["resize_mode"] = chosen.value


# ---------------------------------------------------------------------------- answers
def infotext(body: Mapping[str, Any], seed: int, sampler_name: str, schedule: str, model: str) -> str:
    """The web UI's parameters text of one image."""
    lines = [body["prompt"]]
    if body.get("negative_prompt"):
        lines.append(f"Negative prompt: {body['negative_prompt']}")
    fields = [
        f"Steps: {body['steps']}",
        f"Sampler: {sampler_name}",
        f"Schedule type: {SCHEDULES.get(schedule, schedule)}",
        f"CFG scale: {body['guidance']:g}",
        f"Seed: {seed}",
        f"Size: {body['width']}x{body['height']}",
        f"Model: {model}",
    ]
    if body.get("denoise") is not None and body.get("init_image"):
        fields.append(f"Denoising strength: {body['denoise']:g}")
    for i, c in enumerate(body.get("controls", [])):
        fields.append(
            f'ControlNet {i}: "Module: {c.get("preprocess") or "none"}, Model: {c["controlnet"]}, '
            f'Weight: {c["strength"]:g}, Guidance Start: {c["start"]:g}, Guidance End: {c["end"]:g}"'
        )
    fields.append(f"Version: controlnet {__version__}")
    return "\n".join(lines) + "\n" + ", ".join(fields)


def answer(
    payload: Mapping[str, Any], body: Mapping[str, Any], out: dict[str, Any], model: str, detected: list[str]
) -> dict[str, Any]:
    """The web UI's answer: ``images`` (base64 PNG; the units' detected maps after the samples, as
    the extension sends them), ``parameters`` (the payload as given) and ``info`` (a JSON string
    with the seeds and the parameters text of each image)."""
    seeds = out["seeds"]
    sampler_name = payload.get("sampler_name") or payload.get("sampler_index") or "Euler a"
    schedule = (payload.get("scheduler") or "automatic").lower()
    prompts = [body["prompt"]] * len(seeds)
    info = {
        "prompt": body["prompt"],
        "all_prompts": prompts,
        "negative_prompt": body["negative_prompt"],
        "all_negative_prompts": [body["negative_prompt"]] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": body["width"],
        "height": body["height"],
        "sampler_name": sampler_name,
        "scheduler": schedule,
        "cfg_scale": body["guidance"],
        "steps": body["steps"],
        "batch_size": int(payload.get("batch_size") or 1),
        "clip_skip": body["clip_skip"],
        "denoising_strength": body.get("denoise") if body.get("init_image") else body.get("hires_denoise"),
        "sd_model_name": model,
        "index_of_first_image": 0,
        "infotexts": [infotext(body, s, sampler_name, schedule, model) for s in seeds],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "version": f"controlnet {__version__}",
    }
    if "stopped" in out:
        info["interrupted"] = out["stopped"]
    send = payload.get("send_images", True) is not False
    return {
        "images": [*out["images"], *detected] if send else [],
        "parameters": {k: v for k, v in payload.items()},
        "info": json.dumps(info),
    }
