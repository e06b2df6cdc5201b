"""The whole controllable text-to-image job: a request in, images and a replayable record out.

A :class:`GenerationRequest` holds every parameter as plain data (paths, numbers, names), so it
is checked in full before any model work, written to a JSON sidecar beside the images, and
replayed from that sidecar bit for bit. :func:`generate` runs it on loaded models.

A request with ``hires_scale`` > 1 runs the A1111 web UI's "hires fix": the first pass makes the
images at the requested size, they are enlarged (their latents, or their pixels re-encoded), and a
second, img2img pass at the larger size with the controls detected afresh there adds the detail a
model trained at the smaller size would not draw all at once.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..annotators import get as _get_annotator
from ..annotators.utils import condition_tensor, fill_box, fit_to, model_size, resize_to
from ..choices import (
    ControlMode,
    HiresUpscaler,
    PromptSetting,
    PromptSyntax,
    ResizeMode,
    Sampler,
    TimestepSpacing,
    parse_choice,
)
from ..families.sd.base import BaseModel
from ..families.sd.controlnet import ControlNet
from ..imageio import read_image, read_mask
from ..model.fastpath import compile_modules
from ..text.prompts import encode_guided
from .sampling import ControlUnit, check_spacing, check_steps, denoise, mask_to_latent, steps_run

__all__ = [
    "DEFAULT_ADDED_PROMPT",
    "DEFAULT_NEGATIVE_PROMPT",
    "MAX_HIRES_SCALE",
    "PAPER_DEFAULT_PROMPT",
    "ControlRequest",
    "GenerationRequest",
    "GenerationResult",
    "LoraRequest",
    "final_size",
    "generate",
]

DEFAULT_ADDED_PROMPT = "best quality, extremely detailed"
DEFAULT_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)
#: The paper's "default prompt" setting.
PAPER_DEFAULT_PROMPT = "a professional, detailed, high-quality image"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: the largest enlargement of the hires fix
MAX_HIRES_SCALE = 4.0


#: the A1111 web UI's LoRA tags in a prompt: <lora:name:scale>, <lyco:...>, <locon:...>
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|locon):[^:>]+(?::(?P<scale>[^:>]*))?[^>]*>", re.IGNORECASE)


@dataclass
class ControlRequest:
    """One control unit as plain data.

    image: a ready condition map, or a raw image when ``preprocess`` names an annotator.
    controlnet: a ControlNet file or folder (None: the bundled ControlNet).
    params: annotator parameters.
    region_mask: an image, white (or opaque) where this control acts; None: everywhere. It is
        fitted to the output like the condition (padding: outside the region).
    """

    image: str
    controlnet: str | None = None
    preprocess: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = ControlMode.BALANCED.value
    guess_mode: bool = False
    region_mask: str | None = None


@dataclass
class LoraRequest:
    """A LoRA file merged into the base model's weights, ``scale`` times (1: as trained)."""

    path: str
    scale: float = 1.0


def _nested(cls: type, d: dict[str, Any], where: str) -> Any:
    """``cls(**d)`` for a part of a request read from JSON, naming ``where`` unknown keys are."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown parameters {sorted(unknown)}")
    return cls(**d)


@dataclass
class GenerationRequest:
    """Every parameter of a generation. Paths are strings; ``seed`` None draws one (recorded)."""

    prompt: str = ""
    controls: list[ControlRequest] = field(default_factory=list)
    prompt_setting: str = PromptSetting.USER.value
    added_prompt: str = DEFAULT_ADDED_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    prompt_syntax: str = PromptSyntax.WEIGHTED.value  # emphasis brackets and long prompts, or plain
    clip_skip: int = 1  # the text encoder layer read, from the end (SD1.x; 1: the last)
    base: str | None = None
    vae: str | None = None  # a VAE file or folder used in place of the base model's
    loras: list[LoraRequest] = field(default_factory=list)  # merged into the base model, in order
    sampler: str = Sampler.DDIM.value
    timestep_spacing: str = TimestepSpacing.DEFAULT.value  # leading / linspace / trailing
    eta: float = 0.0
    steps: int = 20
    guidance: float = 9.0
    seed: int | None = None
    num_samples: int = 1
    resolution: int | None = None  # short side; None: the base model's native size
    width: int | None = None
    height: int | None = None
    resize_mode: str = ResizeMode.STRETCH.value  # how images of another aspect fit the output
    init_image: str | None = None
    denoise: float = 1.0
    mask: str | None = None
    mask_blur: int = 4  # feather (px) of the paste-back of the source's unmasked pixels
    overlay: bool = True  # paste the source's unmasked pixels back after decoding
    captioner: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    fast: bool = False  # compile the networks (slow first call; CUDA graphs are on for CUDA anyway)
    offload: bool = False  # text encoders and VAE in CPU memory, on the GPU only while they run
    vae_tiling: bool = False  # encode and decode images larger than the VAE's tile in tiles
    hires_scale: float = 1.0  # > 1: a second pass at this many times the size (the hires fix)
    hires_denoise: float = 0.7  # the second pass's img2img strength
    hires_steps: int | None = None  # the second pass's steps before denoise (None: steps)
    hires_upscaler: str = HiresUpscaler.LATENT.value

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generation parameters {sorted(unknown)}")
        d = dict(d)
        controls = [_nested(ControlRequest, c, f"control {i}") for i, c in enumerate(d.pop("controls", []))]
        loras = [_nested(LoraRequest, x, f"loras[{i}]") for i, x in enumerate(d.pop("loras", []))]
        return cls(controls=controls, loras=loras, **d)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check everything that can be checked without a model; raise ValueError/FileNotFoundError
        naming the parameter (or file) and what was expected."""
        sampler = parse_choice(Sampler, self.sampler, "sampler")
        check_spacing(sampler, parse_choice(TimestepSpacing, self.timestep_spacing, "timestep spacing"))
        parse_choice(ResizeMode, self.resize_mode, "resize mode")
        parse_choice(PromptSyntax, self.prompt_syntax, "prompt syntax")
        setting = parse_choice(PromptSetting, self.prompt_setting, "prompt setting")
        for name in ("prompt", "added_prompt", "negative_prompt"):
            tag = _NETWORK_TAG.search(getattr(self, name))
            if tag:  # it would be read as words: say where LoRAs go instead
                raise ValueError(
                    f"{name}: {tag[0]!r} is the A1111 web UI's LoRA tag, which prompts here do not "
                    f"read; merge the file with --lora FILE:{tag['scale'] or 1} (the API: serve --lora)"
                )
        check_steps(sampler, self.steps)
        if self.clip_skip < 1:
            raise ValueError(
                f"clip_skip must be >= 1 (1: the text encoder's last layer), got {self.clip_skip}"
            )
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if not 0.0 < self.denoise <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {self.denoise}")
        self._validate_hires()
        if not 0.0 <= self.eta <= 1.0:  # outside [0, 1] DDIM's noise is undefined: NaN images
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of: {', '.join(_DTYPES)}")
        if self.offload and self.device.split(":")[0] == "cpu":
            raise ValueError(
                "offload keeps the text encoders and the VAE in CPU memory while a GPU runs the "
                f"UNet; it needs a GPU device, got device {self.device!r}"
            )
        for name in ("resolution", "width", "height"):
            v = getattr(self, name)
            if v is not None and not 64 <= v <= 4096:
                raise ValueError(f"{name} must be between 64 and 4096 pixels, got {v}")
        if self.mask_blur < 0:
            raise ValueError(f"mask_blur must be >= 0 pixels, got {self.mask_blur}")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if setting is PromptSetting.AUTO and not self.captioner:
            raise ValueError("prompt setting 'auto' needs a captioner folder (--captioner)")
        for i, c in enumerate(self.controls):
            if c.strength < 0:
                raise ValueError(f"control {i}: strength must be >= 0, got {c.strength}")
            if not (0 <= c.start <= 1 and 0 <= c.end <= 1):
                raise ValueError(
                    f"control {i}: start/end must be fractions in [0, 1], got {c.start}, {c.end}"
                )
            if c.start > c.end:
                raise ValueError(f"control {i}: start {c.start} is after end {c.end}")
            parse_choice(ControlMode, c.mode, f"control {i} mode")
            read_image(c.image)  # readable, an image, not huge
            if c.region_mask is not None:
                try:
                    read_mask(c.region_mask)
                except (ValueError, FileNotFoundError) as e:
                    raise type(e)(f"control {i}: region mask: {e}") from None
            if c.preprocess is not None:
                ann = _get_annotator(c.preprocess)
                ann.check_params(c.params)
                if "mask" in ann.inputs and self.mask is None:
                    raise ValueError(
                        f"control {i}: annotator {ann.name} needs a mask; it reads the request's "
                        "mask (white = regenerate), which needs an init image too"
                    )
            if c.controlnet is not None and not Path(c.controlnet).exists():
                raise FileNotFoundError(f"control {i}: ControlNet {c.controlnet} does not exist")
        if self.base is not None and not Path(self.base).exists():
            raise FileNotFoundError(f"base model {self.base} does not exist")
        if self.vae is not None and not Path(self.vae).exists():
            raise FileNotFoundError(f"VAE {self.vae} does not exist")
        for i, lora in enumerate(self.loras):
            if not Path(lora.path).exists():
                raise FileNotFoundError(f"LoRA {lora.path} does not exist")
            if not math.isfinite(lora.scale):
                raise ValueError(f"loras[{i}]: scale must be a finite number, got {lora.scale}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init image (the picture whose unmasked region is kept)")
        if self.init_image is not None:
            init = read_image(self.init_image)
            if self.mask is not None:
                mask = read_mask(self.mask)
                if mask.shape != init.shape[:2]:
                    raise ValueError(
                        f"mask {self.mask} is {mask.shape[1]}x{mask.shape[0]} but the init image "
                        f"{self.init_image} is {init.shape[1]}x{init.shape[0]}; they must match"
                    )

    def _validate_hires(self) -> None:
        parse_choice(HiresUpscaler, self.hires_upscaler, "hires upscaler")
        if not 1.0 <= self.hires_scale <= MAX_HIRES_SCALE:
            raise ValueError(
                f"hires_scale must be between 1 (off) and {MAX_HIRES_SCALE:g}, got {self.hires_scale}"
            )
        if not 0.0 < self.hires_denoise <= 1.0:
            raise ValueError(f"hires_denoise must be in (0, 1], got {self.hires_denoise}")
        if self.hires_steps is not None and self.hires_steps < 1:
            raise ValueError(f"hires_steps must be >= 1 (or none: steps), got {self.hires_steps}")
        if self.hires_steps is not None:
            check_steps(self.sampler, self.hires_steps, "hires_steps")
        if self.hires_scale > 1.0 and self.init_image is not None:
            raise ValueError(
                "hires_scale is for text-to-image generations; with an init image, ask for the size "
                "itself (resolution, or width and height)"
            )


@dataclass
class GenerationResult:
    request: GenerationRequest  # as run: seed and prompt resolved
    images: list[np.ndarray]  # (H, W, 3) uint8 per sample
    conditions: list[np.ndarray]  # (H, W, 3) uint8 per control, as fed to the model
    prompt: str  # the full prompt given to the text encoder
    seeds: list[int]
    seconds: float
    latents: torch.Tensor  # final latents (B, C, h, w), before decoding


# ---------------------------------------------------------------------- conditions
def _prepare_condition(
    c: ControlRequest, size_hw: tuple[int, int], mode: ResizeMode, mask: np.ndarray | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """The control's map at the output size, fitted by ``mode``, and the model's tensor of it. A
    ready map keeps its alpha channel (an inpainting map's alpha-0 pixels become -1); an annotator
    that takes a mask (inpaint) gets ``mask``, the request's mask at the output size."""
    if c.preprocess is None:
        cond_map = fit_to(read_image(c.image, alpha=True), size_hw, mode)
        return cond_map, condition_tensor(cond_map)
    ann = _get_annotator(c.preprocess)
    image = read_image(c.image)
    # detect at the size the image takes in the output (as the released apps detected at the output
    # size), so edge widths etc. match the model's view; with FILL the map itself is padded after
    if mode is ResizeMode.FILL:
        h, w, top, left = fill_box(image.shape[:2], size_hw)
        source = resize_to(image, (h, w))
    else:
        (h, w), top, left = size_hw, 0, 0
        source = fit_to(image, size_hw, mode)
    extra = {}
    if "mask" in ann.inputs and mask is not None:
        extra["mask"] = mask[top : top + h, left : left + w] > 0.5
    detected = resize_to(ann(source, **c.params, **extra), (h, w), nearest=ann.nearest)
    cond_map = fit_to(detected, size_hw, mode, nearest=ann.nearest)
    return cond_map, condition_tensor(cond_map, invert=ann.model_invert)


def _first_image(req: GenerationRequest) -> str | None:
    """The image that sets the output's aspect (and is captioned): the init image, else control 0's."""
    return req.init_image or (req.controls[0].image if req.controls else None)


def output_size(req: GenerationRequest, native: int) -> tuple[int, int]:
    """(H, W) of the images ``req`` makes: an explicit width and height (multiples of 64), else the
    first image's aspect with the short side at the resolution (default ``native``), else square."""
    from PIL import Image

    if req.width is not None and req.height is not None:
        return max(64, round(req.height / 64) * 64), max(64, round(req.width / 64) * 64)
    side = req.resolution or native
    first = _first_image(req)
    if first is None:
        return side, side
    with Image.open(first) as img:  # the header is enough: read_image never rotates
        w, h = img.size
    return model_size(h, w, side)


def final_size(req: GenerationRequest, native: int) -> tuple[int, int]:
    """(H, W) of the images ``req`` returns: :func:`output_size`, enlarged by the hires fix (to the
    nearest multiples of 64) when it is on."""
    h, w = output_size(req, native)
    if req.hires_scale == 1.0:
        return h, w
    h, w = (max(64, int(v * req.hires_scale / 64 + 0.5) * 64) for v in (h, w))  # halves up
    if max(h, w) > 4096:
        raise ValueError(
            f"hires_scale {req.hires_scale:g} would make {w}x{h} images; the sides must stay within "
            "4096 pixels"
        )
    return h, w


def resolve_prompt(req: GenerationRequest, caption: Callable[[np.ndarray], str] | None = None) -> str:
    """The text the encoder reads under the request's prompt setting, with the added prompt."""
    setting = PromptSetting(req.prompt_setting)
    if setting is PromptSetting.NONE:
        return ""  # the paper's no-prompt setting: nothing at all, not even the added prompt
    if setting is PromptSetting.DEFAULT:
        text = PAPER_DEFAULT_PROMPT
    elif setting is PromptSetting.AUTO:
        source = _first_image(req)
        if source is None:
            raise ValueError(
                "prompt setting 'auto' needs an image to caption (a control image or init image)"
            )
        if caption is None:
            from .captioner import Captioner

            caption = Captioner(req.captioner)  # type: ignore[arg-type]
        text = caption(read_image(source))
    else:
        text = req.prompt
    return ", ".join(p for p in (text.strip(), req.added_prompt.strip()) if p)


# ---------------------------------------------------------------------- the job
def draw_seed() -> int:
    """A random seed for a request that gives none (it is recorded in the result)."""
    return int.from_bytes(os.urandom(4), "little") >> 1


@torch.no_grad()
def generate(
    request: GenerationRequest,
    base: BaseModel,
    controlnets: Sequence[ControlNet],
    *,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
    caption: Callable[[np.ndarray], str] | None = None,
) -> GenerationResult:
    """Run ``request`` on loaded models (``controlnets[i]`` serves ``request.controls[i]``)."""
    request.validate()
    if len(controlnets) != len(request.controls):
        raise ValueError(f"{len(request.controls)} controls but {len(controlnets)} ControlNets")
    base = base.with_clip_skip(request.clip_skip)
    from ..formats import check_compatible

    for i, (c, cn) in enumerate(zip(request.controls, controlnets)):
        check_compatible(
            cn,
            base,
            controlnet_name=f"control {i}'s ControlNet {c.controlnet or '(bundled)'}",
            base_name=f"the base model {request.base or '(bundled)'}",
        )
    seed = request.seed if request.seed is not None else draw_seed()
    req = GenerationRequest.from_dict({**request.to_dict(), "seed": seed})
    started = time.perf_counter()
    dtype = _DTYPES[req.dtype]
    base.to(req.device, dtype, offload=req.offload)
    for cn in controlnets:
        cn.to(req.device, dtype).eval()

    size, big = output_size(req, base.native_size), final_size(req, base.native_size)

    mode = ResizeMode(req.resize_mode)
    seeds = [seed + i for i in range(req.num_samples)]
    init_latents = mask = init = pixel_mask = None
    if req.init_image is not None:
        init = fit_to(read_image(req.init_image), size, mode)
        pixels = torch.from_numpy(init).permute(2, 0, 1)[None].float().to(req.device) / 127.5 - 1.0
        init_latents = base.encode_images(
            pixels.to(dtype), _generators(seeds, req.device), tiled=req.vae_tiling
        )
        if req.mask is not None:
            pixel_mask = fit_to(read_mask(req.mask), size, mode, fill=1.0)  # padding: regenerated
            mask = mask_to_latent(torch.from_numpy(pixel_mask)[None, None], base.latent_size(size))

    prompt = resolve_prompt(req, caption)
    hires = req.hires_scale > 1.0
    hires_steps = req.hires_steps or req.steps
    # one progress count over both passes
    first = req.steps if init_latents is None else steps_run(req.steps, req.denoise)
    total = first + (steps_run(hires_steps, req.hires_denoise) if hires else 0)

    def run_pass(
        size: tuple[int, int], init: torch.Tensor | None, steps: int, strength: float, done: int
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Denoise at ``size`` (H, W) from ``init`` latents (None: noise) with the controls
        prepared at that size; the latents and the condition maps fed to the model."""
        maps, units = [], []
        for c, cn in zip(req.controls, controlnets):
            cond_map, cond = _prepare_condition(c, size, mode, pixel_mask)
            maps.append(cond_map[..., :3])
            region = None
            if c.region_mask is not None:
                region = torch.from_numpy(fit_to(read_mask(c.region_mask), size, mode, fill=0.0))[None, None]
            units.append(
                ControlUnit(
                    cn,
                    cond,
                    c.strength,
                    c.start,
                    c.end,
                    ControlMode(c.mode),
                    guess_mode=c.guess_mode,
                    region=region,
                )
            )
        negative = req.negative_prompt if req.guidance != 1.0 else None
        cond_emb, uncond_emb = encode_guided(base, prompt, negative, size=size, syntax=req.prompt_syntax)
        n = req.num_samples
        step_callback = None if callback is None else lambda i, _: callback(done + i, total)
        out = denoise(
            base,
            cond_emb.repeat(n),
            uncond_emb.repeat(n) if uncond_emb is not None else None,
            units,
            sampler=req.sampler,
            timestep_spacing=req.timestep_spacing,
            steps=steps,
            guidance=req.guidance,
            eta=req.eta,
            seeds=seeds,
            latent_size=base.latent_size(size),
            init_latents=init,
            denoise_strength=strength,
            mask=mask,
            progress=progress,
            progress_label="hires pass" if done else "denoising",
            callback=step_callback,
            compile=req.fast,
        )
        return out.latents, maps

    latents, maps = run_pass(size, init_latents, req.steps, req.denoise, 0)
    if req.fast:  # the decoder is a VAE forward of its own: compiled, it takes a third of the time
        compile_modules([base.vae.decoder])
    if hires:
        how = HiresUpscaler(req.hires_upscaler)
        enlarged = _enlarge(base, latents, big, how, seeds, tiled=req.vae_tiling)
        latents, maps = run_pass(big, enlarged, hires_steps, req.hires_denoise, first)
    pixels = base.decode_latents(latents, tiled=req.vae_tiling)
    images = [
        ((p.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for p in pixels
    ]
    if pixel_mask is not None and req.overlay:
        images = [overlay(img, init, pixel_mask, req.mask_blur) for img in images]  # type: ignore[arg-type]
    return GenerationResult(req, images, maps, prompt, seeds, time.perf_counter() - started, latents.cpu())


def _enlarge(
    base: BaseModel,
    latents: torch.Tensor,
    size: tuple[int, int],
    how: HiresUpscaler,
    seeds: list[int],
    *,
    tiled: bool = False,
) -> torch.Tensor:
    """The hires fix's enlargement of first-pass ``latents`` to images of ``size`` (H, W). The
    image upscaler encodes sample i with seed i (``tiled``: the VAE works in tiles)."""
    if how is HiresUpscaler.LATENT:
        return F.interpolate(latents.float(), size=base.latent_size(size), mode="bilinear").to(latents.dtype)
    pixels = F.interpolate(
        base.decode_latents(latents, tiled=tiled), size=size, mode="bicubic", antialias=True
    )
    generators = _generators(seeds, latents.device)
    return base.encode_images(pixels.clamp(-1, 1).to(base.dtype), generators, tiled=tiled)


def _generators(seeds: list[int], device: str | torch.device) -> list[torch.Generator]:
    """One generator per sample seed, so that a VAE posterior draw of sample i is the same in a
    batch as in a single generation of its seed."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def overlay(generated: np.ndarray, source: np.ndarray, mask: np.ndarray, blur: int) -> np.ndarray:
    """Paste ``source`` back where ``mask`` (H, W in [0, 1], 1 = regenerated) is 0. The seam is
    feathered over ``blur`` pixels inside the regenerated area only, so every kept pixel is the
    source's exactly."""
    regenerated = (mask > 0.5).astype(np.uint8)
    if blur > 0:
        # distance of each regenerated pixel to the nearest kept one: 0 on the kept side
        alpha = np.minimum(cv2.distanceTransform(regenerated, cv2.DIST_L2, 3) / blur, 1.0)
    else:
        alpha = regenerated.astype(np.float32)
    alpha = alpha[..., None]
    return (alpha * generated + (1 - alpha) * source).round().clip(0, 255).astype(np.uint8)
