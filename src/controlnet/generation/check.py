"""The one check of a generation request, at the boundary: :func:`check` -> :class:`CheckedRequest`.

Everything that can be known without a model is checked once, before any model work, and every
input image is read here, once: :func:`controlnet.generation.generate.generate` takes the checked
request and the images it holds, and checks nothing of the request again. The shells (command
line, HTTP API, web app, sidecar replay) each call :func:`check` once; the server adds its limits
first (:meth:`controlnet.serving.service.Service.check`).

Errors are ValueError or FileNotFoundError naming the parameter (or file) and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..choices import MAX_SIDE, PromptSetting, check_spacing, check_steps
from ..imageio import flatten_alpha, read_image, read_mask
from ..schema import Kind, check_fields, files
from .request import GenerationRequest
from .sizes import enlarged_size

__all__ = ["CheckedRequest", "check", "image_inputs"]

#: the A1111 web UI's LoRA tags in a prompt: <lora:name:scale>, <lyco:...>, <locon:...>
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|locon):[^:>]+(?::(?P<scale>[^:>]*))?[^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed :func:`check`: its enums are members, and ``images`` holds every
    input image it names, read once (by input name, as :func:`image_inputs` names them: images as
    (H, W, 3) uint8, or (H, W, 4) when the file has transparency; masks as (H, W) float32 in
    [0, 1])."""

    request: GenerationRequest
    images: Mapping[str, np.ndarray] = field(default_factory=dict)

    def image(self, name: str, *, alpha: bool = False) -> np.ndarray:
        """The image input ``name``; transparent pixels composited over white unless ``alpha``."""
        return self.images[name] if alpha else flatten_alpha(self.images[name])


def image_inputs(request: GenerationRequest) -> dict[str, tuple[str, Kind]]:
    """Every image the request reads: input name -> (path, IMAGE or MASK)."""
    kinds = files(request, (Kind.IMAGE, Kind.MASK), with_kind=True)
    return {name: (path, kind) for name, (path, kind) in kinds.items()}


def check(request: GenerationRequest) -> CheckedRequest:
    """Check ``request`` in full - every value's type and bounds, how values go together, that
    every file exists and every image reads - and read its images. Raises ValueError or
    FileNotFoundError naming the parameter (or file) and what was expected."""
    req = check_fields(request)
    check_spacing(req.sampler, req.timestep_spacing)
    check_steps(req.sampler, req.steps)
    for name in ("prompt", "added_prompt", "negative_prompt"):
        tag = _NETWORK_TAG.search(getattr(req, name))
        if tag:  # it would be read as words: say where LoRAs go instead
            raise ValueError(
                f"{name}: {tag[0]!r} is the A1111 web UI's LoRA tag, which prompts here do not "
                f"read; merge the file with --lora FILE:{tag['scale'] or 1} (the API: serve --lora)"
            )
    _check_hires(req)
    if req.offload and req.device.split(":")[0] == "cpu":
        raise ValueError(
            "offload keeps the text encoders and the VAE in CPU memory while a GPU runs the "
            f"UNet; it needs a GPU device, got device {req.device!r}"
        )
    if (req.width is None) != (req.height is None):
        raise ValueError("give both width and height, or neither")
    if req.prompt_setting is PromptSetting.AUTO and not req.captioner:
        raise ValueError("prompt setting 'auto' needs a captioner folder (--captioner)")
    for i, c in enumerate(req.controls):
        if c.start > c.end:
            raise ValueError(f"control {i}: start {c.start} is after end {c.end}")
        if c.preprocess is not None:
            from ..annotators import get

            ann = get(c.preprocess)
            ann.check_params(c.params)
            if "mask" in ann.inputs and req.mask is None:
                raise ValueError(
                    f"control {i}: annotator {ann.name} needs a mask; it reads the request's "
                    "mask (white = regenerate), which needs an init image too"
                )
    if req.mask is not None and req.init_image is None:
        raise ValueError("a mask needs an init image (the picture whose unmasked region is kept)")
    images = _read_images(req)
    for name, path in files(req, (Kind.MODEL, Kind.FILE)).items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{_model_words(name)} {path} does not exist")
    if req.mask is not None:
        init, mask = images["init_image"], images["mask"]
        if mask.shape != init.shape[:2]:
            raise ValueError(
                f"mask {req.mask} is {mask.shape[1]}x{mask.shape[0]} but the init image "
                f"{req.init_image} is {init.shape[1]}x{init.shape[0]}; they must match"
            )
    return CheckedRequest(req, images)


def _check_hires(req: GenerationRequest) -> None:
    if req.hires_steps is not None:
        check_steps(req.sampler, req.hires_steps, "hires_steps")
    if req.hires_scale > 1.0 and req.init_image is not None:
        raise ValueError(
            "hires_scale is for text-to-image generations; with an init image, ask for the size "
            "itself (resolution, or width and height)"
        )
    if req.hires_scale > 1.0 and req.width is not None and req.height is not None:
        h, w = enlarged_size((req.height, req.width), req.hires_scale)
        if max(h, w) > MAX_SIDE:
            raise ValueError(
                f"hires_scale {req.hires_scale:g} would make {w}x{h} images; the sides must stay "
                f"within {MAX_SIDE} pixels"
            )


def _read_images(req: GenerationRequest) -> dict[str, np.ndarray]:
    """Every input image, read once; errors name the input (controls by their number)."""
    images = {}
    for name, (path, kind) in image_inputs(req).items():
        if kind is Kind.MASK:
            try:
                images[name] = read_mask(path)
            except (ValueError, FileNotFoundError) as e:
                what = _control_words(name)
                raise type(e)(f"{what}: {e}" if what else str(e)) from None
        else:
            images[name] = read_image(path, alpha=True)
    return images


def _control_words(name: str) -> str:
    """ "controls[0].region_mask" -> "control 0: region mask"; "" for the request's own inputs."""
    m = re.fullmatch(r"controls\[(\d+)\]\.(\w+)", name)
    return f"control {m[1]}: {m[2].replace('_', ' ')}" if m else ""


def _model_words(name: str) -> str:
    """How a missing model file is named: "base model", "VAE", "LoRA", "control 0: ControlNet"."""
    m = re.fullmatch(r"controls\[(\d+)\]\.controlnet", name)
    if m:
        return f"control {m[1]}: ControlNet"
    if name.startswith("loras["):
        return "LoRA"
    return {"base": "base model", "vae": "VAE", "captioner": "captioner"}.get(name, name)
