"""A generation request, declared once: every parameter with its default, help, bounds and owner.

:class:`GenerationRequest` holds every parameter as plain data (paths, numbers, names), so that it
is checked in full before any model work (:func:`controlnet.generation.check.check`), written to
a JSON sidecar beside the images and replayed from it bit for bit. Its fields are declared with
:func:`controlnet.schema.param`; the command line's flags, the HTTP API's body, the web app's
ranges and labels and the sidecar's reading and writing are all derived from these declarations,
so a new parameter is one field here plus its use.

A request with ``hires_scale`` > 1 runs the A1111 web UI's "hires fix": the first pass makes the
images at the requested size, they are enlarged (their latents, or their pixels re-encoded), and a
second, img2img pass at the larger size with the controls detected afresh there adds the detail a
model trained at the smaller size would not draw all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..choices import (
    MAX_SIDE,
    ControlMode,
    DType,
    HiresUpscaler,
    PromptSetting,
    PromptSyntax,
    ResizeMode,
    Sampler,
    TimestepSpacing,
)
from ..schema import Kind, Owner, from_dict, param, to_dict

__all__ = [
    "DEFAULT_ADDED_PROMPT",
    "DEFAULT_NEGATIVE_PROMPT",
    "MAX_HIRES_SCALE",
    "MAX_SEED",
    "PAPER_DEFAULT_PROMPT",
    "ControlRequest",
    "GenerationRequest",
    "LoraRequest",
]

DEFAULT_ADDED_PROMPT = "best quality, extremely detailed"
DEFAULT_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)
#: The paper's "default prompt" setting.
PAPER_DEFAULT_PROMPT = "a professional, detailed, high-quality image"
#: the largest enlargement of the hires fix
MAX_HIRES_SCALE = 4.0
#: the largest seed: one a browser's numbers hold exactly (2**53 - 1), less room for one seed per
#: sample (sample i takes seed + i)
MAX_SEED = 2**53 - 1 - 1024
#: the most steps a pass takes (the training schedule's 1000 timesteps)
MAX_STEPS = 1000


@dataclass
class ControlRequest:
    """One control unit as plain data."""

    image: str = param(
        help="the condition map, or a raw image when preprocess names an annotator",
        label="Image",
        kind=Kind.IMAGE,
        group="controls",
    )
    controlnet: str | None = param(
        None,
        help="the ControlNet: a file or folder (a Control-LoRA is built on the base; default: the "
        "bundled one), or in the API a name from /api/health (default: the server's first)",
        label="ControlNet",
        kind=Kind.MODEL,
        group="controls",
    )
    preprocess: str | None = param(
        None,
        help="the annotator to run on the image (none: the image is a ready condition map, whose "
        "alpha-0 pixels, as in an inpaint map, reach the model as -1; inpaint reads the mask)",
        label="Annotator",
        group="controls",
    )
    params: dict[str, Any] = param(
        help="annotator parameters by name",
        default_factory=dict,
        flag="--param",
        group="controls",
    )
    strength: float = param(
        1.0,
        help="how strongly the control acts",
        label="Strength",
        minimum=0.0,
        maximum=10.0,
        group="controls",
    )
    start: float = param(
        0.0,
        help="the fraction of the steps at which the control starts acting",
        label="Start (fraction of steps)",
        minimum=0.0,
        maximum=1.0,
        interval=True,
        group="controls",
    )
    end: float = param(
        1.0,
        help="the fraction of the steps at which the control stops acting",
        label="End (fraction of steps)",
        minimum=0.0,
        maximum=1.0,
        interval=True,
        group="controls",
    )
    mode: ControlMode = param(
        ControlMode.BALANCED,
        help="balanced, prompt (my prompt is more important) or controlnet (ControlNet is more important)",
        label="Control mode",
        group="controls",
    )
    guess_mode: bool = param(
        False,
        help="ControlNet is more important (the released apps' guess mode): no prompt needed",
        label="Guess mode (no prompt needed)",
        group="controls",
    )
    control_type: int | str | None = param(
        None,
        help="a Union ControlNet's kind of condition: a name its model knows (depth, canny, ...; "
        "`controlnet inspect` and /api/health list them) or the model's mode number (required by a "
        "Union ControlNet, refused by any other)",
        label="Control type (Union)",
        minimum=0,
        maximum=63,
        group="controls",
    )
    region_mask: str | None = param(
        None,
        help="where the control acts: white (or opaque) pixels (none: everywhere); fitted to the "
        "output like the condition, its padding outside the region",
        label="Region mask",
        kind=Kind.MASK,
        group="controls",
    )


@dataclass
class LoraRequest:
    """A LoRA file merged into the base model's weights, ``scale`` times (1: as trained)."""

    path: str = param(help="the LoRA file", kind=Kind.MODEL)
    scale: float = param(
        1.0, help="how much of the LoRA is merged (1: as trained)", minimum=-16.0, maximum=16.0
    )


@dataclass
class GenerationRequest:
    """Every parameter of a generation. Paths are strings; ``seed`` None draws one (recorded).
    Enum-typed fields also take their values as strings until the request is checked."""

    prompt: str = param(
        "", help="what to draw (read as the prompt syntax says)", label="Prompt", group="prompt"
    )
    controls: list[ControlRequest] = param(
        help="the control units, in order",
        default_factory=list,
        kind=Kind.PARTS,
        item="control {i}",
        cli=False,
    )
    prompt_setting: PromptSetting = param(
        PromptSetting.USER,
        help="the paper's settings: the user prompt, none, the default prompt, or auto (a caption of "
        "the first image; needs a captioner)",
        label="Prompt setting",
        group="prompt",
    )
    added_prompt: str = param(
        DEFAULT_ADDED_PROMPT,
        help="appended to the prompt (the released apps' quality words)",
        label="Added prompt",
        group="prompt",
    )
    negative_prompt: str = param(
        DEFAULT_NEGATIVE_PROMPT,
        help="what to steer away from (the released apps' negative prompt)",
        label="Negative prompt",
        group="prompt",
    )
    prompt_syntax: PromptSyntax = param(
        PromptSyntax.WEIGHTED,
        help="weighted: (emphasis), [less], (words:1.5), BREAK and prompts past 75 tokens, as in the "
        "A1111 web UI; plain: the text as it is, cut after 75 tokens",
        label="Prompt syntax",
        group="prompt",
    )
    clip_skip: int = param(
        1,
        help="read the text encoder's Nth layer from the end, as the A1111 web UI's Clip skip "
        "(SD1.x models; 1: the last)",
        label="Clip skip",
        minimum=1,
        maximum=12,
        group="prompt",
    )
    base: str | None = param(
        None,
        help="base model file or folder (default: the bundled model)",
        kind=Kind.MODEL,
        owner=Owner.SERVER,
        group="models",
    )
    vae: str | None = param(
        None,
        help="a VAE file or folder to use in place of the base model's (original or diffusers layout)",
        kind=Kind.MODEL,
        owner=Owner.SERVER,
        group="models",
    )
    loras: list[LoraRequest] = param(
        help="LoRA files merged into the base model, in order",
        default_factory=list,
        kind=Kind.PARTS,
        item="loras[{i}]",
        owner=Owner.SERVER,
        flag="--lora",
        group="models",
    )
    sampler: Sampler = param(
        Sampler.DDIM,
        help="the sampler, named as the A1111 web UI names it (lcm, for few-step models: at most 50 steps)",
        label="Sampler",
        group="sampling",
    )
    timestep_spacing: TimestepSpacing = param(
        TimestepSpacing.DEFAULT,
        help="which timesteps the steps visit (default: the sampler's own, DDIM leading and the "
        "others linspace; trailing: the A1111 web UI's SGM Uniform, for few-step models such as "
        "SDXL-Turbo and -Lightning; the Karras samplers and lcm take default only)",
        label="Timestep spacing",
        group="sampling",
    )
    eta: float = param(
        0.0,
        help="DDIM's eta: the noise added back at each step",
        label="DDIM eta",
        minimum=0.0,
        maximum=1.0,
        interval=True,
        group="sampling",
    )
    steps: int = param(
        20, help="denoising steps", label="Steps", minimum=1, maximum=MAX_STEPS, group="sampling"
    )
    guidance: float = param(
        9.0,
        help="classifier-free guidance scale (1: none); for a guidance-distilled model (Flux.1-dev) "
        "the scale its network reads",
        label="Guidance scale",
        minimum=0.0,
        maximum=100.0,
        group="sampling",
    )
    true_guidance: float = param(
        1.0,
        help="classifier-free guidance against the negative prompt for a guidance-distilled model "
        "(Flux.1-dev), beside the scale its network reads (1: none; other models take guidance)",
        label="True guidance (distilled models)",
        minimum=0.0,
        maximum=100.0,
        group="sampling",
    )
    guidance_end: float = param(
        1.0,
        help="classifier-free guidance only while the denoising is at most this far along (1 - "
        "timestep / the schedule's length; 1: every step; Z-Image's cfg_truncation); the later steps "
        "take the conditional prediction alone, at half the work",
        label="Guidance end",
        minimum=0.0,
        maximum=1.0,
        group="sampling",
    )
    guidance_renorm: float = param(
        0.0,
        help="the guided prediction's norm capped at this multiple of the conditional one's, per "
        "sample (0: no cap; Z-Image's cfg_normalization)",
        label="Guidance norm cap",
        minimum=0.0,
        maximum=100.0,
        group="sampling",
    )
    seed: int | None = param(
        None,
        help="the first sample's seed; sample i takes seed + i (default: a random seed, recorded)",
        label="Seed",
        minimum=0,
        maximum=MAX_SEED,
        bounds=f"between 0 and {MAX_SEED}",
        group="sampling",
    )
    num_samples: int = param(
        1, help="images per generation", label="Samples", minimum=1, maximum=64, group="sampling"
    )
    resolution: int | None = param(
        None,
        help="the short side in pixels, the sides rounded to multiples of 64 (default: the model's "
        "native size)",
        label="Resolution (short side)",
        minimum=64,
        maximum=MAX_SIDE,
        unit="pixels",
        group="size",
    )
    width: int | None = param(
        None,
        help="the width in pixels (with the height)",
        minimum=64,
        maximum=MAX_SIDE,
        unit="pixels",
        group="size",
    )
    height: int | None = param(
        None,
        help="the height in pixels (with the width)",
        minimum=64,
        maximum=MAX_SIDE,
        unit="pixels",
        group="size",
    )
    resize_mode: ResizeMode = param(
        ResizeMode.STRETCH,
        help="how images of another aspect fit the output: stretch, crop the centre, or fill (pad; "
        "a mask's padding is regenerated)",
        label="Images of another aspect",
        group="size",
    )
    init_image: str | None = param(
        None,
        help="the img2img / masked editing source",
        label="Init image",
        kind=Kind.IMAGE,
        group="img2img",
    )
    denoise: float = param(
        1.0,
        help="img2img strength: the fraction of the schedule run",
        label="Denoise (img2img strength)",
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        interval=True,
        group="img2img",
    )
    mask: str | None = param(
        None,
        help="white (or opaque) = regenerate, black = keep the init image, of the init image's size",
        label="Mask",
        kind=Kind.MASK,
        group="img2img",
    )
    mask_blur: int = param(
        4,
        help="the feather of the paste-back of the kept pixels",
        label="Mask feather (px)",
        minimum=0,
        maximum=256,
        unit="pixels",
        group="img2img",
    )
    overlay: bool = param(
        True,
        help="paste the kept pixels back after decoding",
        label="Paste kept pixels back",
        group="img2img",
    )
    captioner: str | None = param(
        None,
        help="a local BLIP captioner folder, for the 'auto' prompt setting",
        kind=Kind.FILE,
        owner=Owner.SERVER,
        group="prompt",
    )
    dtype: DType = param(
        DType.FLOAT32, help="the networks' floating-point type", owner=Owner.SERVER, group="device"
    )
    device: str = param(
        "cpu",
        help="cpu, cuda, cuda:1, ... (the command line: cuda when available)",
        owner=Owner.SERVER,
        group="device",
    )
    fast: bool = param(
        False,
        help="compile the networks: a slow first call, faster ones after",
        owner=Owner.SERVER,
        group="device",
    )
    offload: bool = param(
        False,
        help="keep the text encoders and the VAE in CPU memory, on the GPU only while they run; "
        "the denoising network and ControlNets step off the GPU for one that would not fit beside them",
        owner=Owner.SERVER,
        group="memory",
    )
    fp8: bool = param(
        False,
        help="the transformer's and ControlNets' block weights in float8 and their products in FP8 "
        "(Flux.1 and SD3 on Hopper GPUs or later): half their memory, faster; images differ slightly",
        label="FP8 weights",
        owner=Owner.SERVER,
        group="memory",
    )
    vae_tiling: bool = param(
        False,
        help="encode and decode images larger than the VAE's tile (the sample size in its config: "
        "512 px for SD1.x, 1024 for SDXL) in overlapping tiles: memory bounded by the tile; "
        "colours can shift and seams show",
        label="Tiled VAE",
        group="memory",
    )
    hires_scale: float = param(
        1.0,
        help="the hires fix: above 1, a second, img2img pass at this many times the size (sides to "
        "the nearest multiples of 64); text to image only",
        label="Upscale by (1: off)",
        minimum=1.0,
        maximum=MAX_HIRES_SCALE,
        notes={1.0: "off"},
        group="hires",
    )
    hires_denoise: float = param(
        0.7,
        help="the strength of the hires fix's second pass",
        label="Hires denoise",
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        interval=True,
        group="hires",
    )
    hires_steps: int | None = param(
        None,
        help="the second pass's schedule length, of which it runs the last hires_denoise (default: steps)",
        label="Hires steps (0: as Steps)",
        minimum=1,
        maximum=MAX_STEPS,
        group="hires",
    )
    hires_upscaler: HiresUpscaler = param(
        HiresUpscaler.LATENT,
        help="latent: the first pass's latents enlarged bilinearly; image: its images decoded, "
        "enlarged (bicubic) and encoded again",
        label="Upscaler",
        group="hires",
    )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The request as JSON data (the sidecar's ``request``)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Any) -> GenerationRequest:
        """A request from JSON data, every value's type checked (errors name the field)."""
        return from_dict(cls, d)
