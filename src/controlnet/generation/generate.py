"""The whole controllable text-to-image job: a checked request in, images out.

:func:`generate` runs a :class:`~controlnet.generation.check.CheckedRequest` on loaded models:
it prepares each control's condition at the output size (running its annotator), encodes the
prompts, denoises (a hires fix adds a second, img2img pass at a larger size, with the controls
prepared afresh there), decodes, and pastes the kept pixels of a masked edit back. It reads no
file and checks nothing of the request again: :func:`~controlnet.generation.check.check` did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..annotators import get as _get_annotator
from ..annotators.utils import condition_tensor, fill_box, fit_to, resize_to
from ..choices import ControlMode, HiresUpscaler, PromptSetting, ResizeMode
from ..families.protocol import BaseModel, Inpaint
from ..imageio import flatten_alpha, read_image
from ..model.control import resolve_control_type
from .check import CheckedRequest
from .denoiser import ControlUnit
from .request import PAPER_DEFAULT_PROMPT, ControlRequest, GenerationRequest
from .sampling import Sampling, mask_to_latent, render, steps_run, to_images
from .sizes import final_size, first_image, output_size
from .watch import Watch

__all__ = [
    "GenerationResult",
    "draw_seed",
    "generate",
    "overlay",
    "resolve_prompt",
]


@dataclass
class GenerationResult:
    request: GenerationRequest  # as run: seed and prompt resolved
    images: list[np.ndarray]  # (H, W, 3) uint8 per sample
    conditions: list[np.ndarray]  # (H, W, 3) uint8 per control, as fed to the model
    prompt: str  # the full prompt given to the text encoder
    seeds: list[int]
    seconds: float
    latents: torch.Tensor  # final latents (B, C, h, w), before decoding
    #: (steps done, of total) where a stop ended the generation early; None: it ran to the end
    stopped_at: tuple[int, int] | None = None


# ---------------------------------------------------------------------- conditions
def _prepare_condition(
    c: ControlRequest,
    image: np.ndarray,
    size_hw: tuple[int, int],
    mode: ResizeMode,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """The control's map at the output size, fitted by ``mode``, and the model's tensor of it.
    ``image``: the control's image as read (RGBA when the file has transparency). A ready map keeps
    its alpha channel (an inpainting map's alpha-0 pixels become -1); an annotator that takes a mask
    (inpaint) gets ``mask``, the request's mask at the output size."""
    if c.preprocess is None:
        cond_map = fit_to(image, size_hw, mode)
        return cond_map, condition_tensor(cond_map)
    ann = _get_annotator(c.preprocess)
    image = flatten_alpha(image)
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
    cond_map = fit_to(detected, size_hw, mode, nearest=ann.nearest, fill=ann.pad)
    return cond_map, condition_tensor(cond_map, invert=ann.model_invert)


def _inpaint(checked: CheckedRequest, size: tuple[int, int], mode: ResizeMode) -> Inpaint | None:
    """The request's image to edit and its mask at ``size`` (H, W), for ControlNets that read
    them beside their condition; None for a request that is not a masked edit."""
    req = checked.request
    if req.init_image is None or req.mask is None:
        return None
    image = torch.from_numpy(fit_to(checked.image("init_image"), size, mode)).permute(2, 0, 1)[None]
    mask = torch.from_numpy(fit_to(checked.images["mask"], size, mode, fill=1.0))[None, None]
    return Inpaint(image.float() / 255.0, mask.float())


def resolve_prompt(
    req: GenerationRequest,
    caption: Callable[[np.ndarray], str] | None = None,
    source: np.ndarray | None = None,
) -> str:
    """The text the encoder reads under the request's prompt setting, with the added prompt.
    ``source``: the image the 'auto' setting captions (default: the request's first image, read
    from its file)."""
    setting = PromptSetting(req.prompt_setting)
    if setting is PromptSetting.NONE:
        return ""  # the paper's no-prompt setting: nothing at all, not even the added prompt
    if setting is PromptSetting.DEFAULT:
        text = PAPER_DEFAULT_PROMPT
    elif setting is PromptSetting.AUTO:
        path = req.init_image or (req.controls[0].image if req.controls else None)
        if source is None and path is not None:
            source = read_image(path)
        if source is None:
            raise ValueError(
                "prompt setting 'auto' needs an image to caption (a control image or init image)"
            )
        if caption is None:
            from .captioner import Captioner

            caption = Captioner(req.captioner)  # type: ignore[arg-type]
        text = caption(source)
    else:
        text = req.prompt
    return ", ".join(p for p in (text.strip(), req.added_prompt.strip()) if p)


# ---------------------------------------------------------------------- the job
def _check_union_regions(controls: Sequence[ControlRequest], controlnets: Sequence[torch.nn.Module]) -> None:
    """The conditions of one Union ControlNet run in one pass, where a region mask has no place:
    refused before any work, naming the control."""
    users: dict[int, list[int]] = {}
    for i, cn in enumerate(controlnets):
        if hasattr(cn, "forward_union"):
            users.setdefault(id(cn), []).append(i)
    for indices in users.values():
        masked = [i for i in indices if controls[i].region_mask is not None]
        if len(indices) > 1 and masked:
            raise ValueError(
                f"controls[{masked[0]}].region_mask: the controls of one Union ControlNet run in one pass, "
                "which takes no region masks; give one to a Union ControlNet used for one condition"
            )


def draw_seed() -> int:
    """A random seed for a request that gives none (it is recorded in the result)."""
    return int.from_bytes(os.urandom(4), "little") >> 1


@torch.no_grad()
def generate(
    checked: CheckedRequest,
    base: BaseModel,
    controlnets: Sequence[torch.nn.Module],
    *,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
    caption: Callable[[np.ndarray], str] | None = None,
    watch: Watch | None = None,
) -> GenerationResult:
    """Run a checked request on loaded models (``controlnets[i]`` serves control i). ``watch``
    follows the steps of both passes, previews the image on request and may stop the generation
    early: it then decodes what it has (a stop in the first pass skips the hires fix)."""
    if not isinstance(checked, CheckedRequest):
        raise TypeError("generate() takes a checked request: generate(check(request), ...)")
    request = checked.request
    if len(controlnets) != len(request.controls):
        raise ValueError(f"{len(request.controls)} controls but {len(controlnets)} ControlNets")
    base.check_clip_skip(request.clip_skip)
    base = base.with_clip_skip(request.clip_skip)
    for i, (c, cn) in enumerate(zip(request.controls, controlnets)):
        base.check_controlnet(
            cn,
            controlnet_name=f"control {i}'s ControlNet {c.controlnet or '(bundled)'}",
            base_name=f"the base model {request.base or '(bundled)'}",
        )
    kinds = [
        resolve_control_type(c.control_type, cn, f"controls[{i}].control_type")
        for i, (c, cn) in enumerate(zip(request.controls, controlnets))
    ]
    _check_union_regions(request.controls, controlnets)
    seed = request.seed if request.seed is not None else draw_seed()
    req = replace(request, seed=seed)
    started = time.perf_counter()
    dtype = req.dtype.torch
    if req.fp8:  # before the move: the bf16 weights need never be on the card whole
        base.use_fp8(controlnets, device=req.device, dtype=dtype)
    base.to(req.device, dtype, offload=req.offload, companions=controlnets)

    size, big = output_size(checked, base.native_size), final_size(checked, base.native_size)

    mode = req.resize_mode
    seeds = [seed + i for i in range(req.num_samples)]
    init_latents = mask = init = pixel_mask = None
    if req.init_image is not None:
        init = fit_to(checked.image("init_image"), size, mode)
        pixels = torch.from_numpy(init).permute(2, 0, 1)[None].float().to(req.device) / 127.5 - 1.0
        init_latents = base.encode_images(
            pixels.to(dtype), _generators(seeds, req.device), tiled=req.vae_tiling
        )
        if req.mask is not None:
            pixel_mask = fit_to(checked.images["mask"], size, mode, fill=1.0)  # padding: regenerated
            mask = mask_to_latent(torch.from_numpy(pixel_mask)[None, None], base.latent_size(size))

    captioned = first_image(checked)
    source = checked.image(captioned) if captioned is not None else None
    prompt = resolve_prompt(req, caption, source)
    hires = req.hires_scale > 1.0
    hires_steps = req.hires_steps or req.steps
    # one progress count over both passes
    first = req.steps if init_latents is None else steps_run(req.steps, req.denoise)
    total = first + (steps_run(hires_steps, req.hires_denoise) if hires else 0)
    if watch is not None:
        watch.begin(total)
        watch.decode = lambda latents: to_images(base, latents.to(base.dtype), tiled=req.vae_tiling)

    def run_pass(
        size: tuple[int, int], init: torch.Tensor | None, steps: int, strength: float, done: int
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Denoise at ``size`` (H, W) from ``init`` latents (None: noise) with the controls
        prepared at that size; the latents and the condition maps fed to the model."""
        maps, units = [], []
        inpaint = _inpaint(checked, size, mode)
        for i, (c, cn, kind) in enumerate(zip(req.controls, controlnets, kinds)):
            image = checked.images[f"controls[{i}].image"]
            cond_map, cond = _prepare_condition(c, image, size, mode, pixel_mask)
            maps.append(cond_map[..., :3])
            region = None
            if c.region_mask is not None:
                region_mask = checked.images[f"controls[{i}].region_mask"]
                region = torch.from_numpy(fit_to(region_mask, size, mode, fill=0.0))[None, None]
            units.append(
                ControlUnit(
                    cn,
                    cond,
                    c.strength,
                    c.start,
                    c.end,
                    ControlMode(c.mode),
                    guess_mode=c.guess_mode,
                    control_type=kind,
                    region=region,
                    inpaint=inpaint,
                )
            )
        n = req.num_samples
        step_callback = None if callback is None else lambda i, _: callback(done + i, total)
        if watch is not None:
            watch.offset = done
        out = render(
            base,
            units,
            [prompt] * n,
            [req.negative_prompt] * n,
            seeds,
            size,
            Sampling.of(req),
            syntax=req.prompt_syntax,
            steps=steps,
            init_latents=init,
            denoise_strength=strength,
            mask=mask,
            progress=progress,
            progress_label="hires pass" if done else "denoising",
            callback=step_callback,
            watch=watch,
            compile=req.fast,
        )
        return out.latents, maps

    latents, maps = run_pass(size, init_latents, req.steps, req.denoise, 0)
    if req.fast:  # the decoder is a VAE forward of its own: compiled, it takes a third of the time
        base.compile(vae=True)
    if hires and (watch is None or watch.stopped_at is None):
        enlarged = _enlarge(base, latents, big, req.hires_upscaler, seeds, tiled=req.vae_tiling)
        latents, maps = run_pass(big, enlarged, hires_steps, req.hires_denoise, first)
    images = to_images(base, latents, tiled=req.vae_tiling)
    if pixel_mask is not None and req.overlay:
        images = [overlay(img, init, pixel_mask, req.mask_blur) for img in images]  # type: ignore[arg-type]
    stopped = watch.stopped_at if watch is not None else None
    seconds = time.perf_counter() - started
    return GenerationResult(req, images, maps, prompt, seeds, seconds, latents.cpu(), stopped)


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
