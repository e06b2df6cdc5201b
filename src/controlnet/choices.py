"""The named settings users choose from (a sampler, a control mode, a dtype, ...), in one place.

Each is a string Enum (a member equals its value) whose values are what users type, what the
sidecar stores and what the API accepts; :func:`parse_choice` reads a name into its member with an
error that names the setting and lists what it takes. This module imports nothing heavy, so that
the command line's help can be built from the request schema without loading torch or diffusers.
What a choice does lives with the code that does it (a family's schedulers, e.g.
:mod:`controlnet.families.sd.schedulers`; control scales in :mod:`controlnet.model.control`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

__all__ = [
    "MAX_LCM_STEPS",
    "MAX_SIDE",
    "OBJECTIVES",
    "ControlMode",
    "DType",
    "EvalMetric",
    "HiresUpscaler",
    "PromptSetting",
    "PromptSyntax",
    "ResizeMode",
    "Sampler",
    "TimestepSpacing",
    "check_spacing",
    "check_steps",
    "parse_choice",
]

E = TypeVar("E", bound=Enum)


def parse_choice(enum: type[E], value: Any, what: str) -> E:
    """``enum``'s member whose value is ``value`` (a member is returned as it is); otherwise a
    ValueError: "unknown {what} {value!r}; expected one of: ..." with every value."""
    try:
        return enum(value)
    except ValueError:
        names = ", ".join(str(e.value) for e in enum)
        raise ValueError(f"unknown {what} {value!r}; expected one of: {names}") from None


class DType(str, Enum):
    """The floating-point types weights and activations are held in: one vocabulary for
    generation, conversion and training. The short names of other tools (fp32, fp16, bf16, and
    accelerate's "no" for full precision) are read as their members."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @classmethod
    def _missing_(cls, value: object) -> DType | None:
        aliases = {"fp32": "float32", "no": "float32", "fp16": "float16", "bf16": "bfloat16"}
        return cls(aliases[value]) if isinstance(value, str) and value in aliases else None

    @classmethod
    def parse(cls, value: str | DType) -> DType:
        return parse_choice(cls, value, "dtype")

    @property
    def torch(self):  # -> torch.dtype (torch is imported when it is asked for)
        import torch

        return getattr(torch, self.value)

    @property
    def accelerate(self) -> str:
        """accelerate's name for mixed precision in this type ("no": full precision)."""
        return {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}[self.value]


class Sampler(str, Enum):
    """The samplers, named as the A1111 web UI names them (one model call per step each). LCM is
    for models distilled to take few steps (an LCM-LoRA merged with ``--lora``): 2-8 steps,
    guidance 1-2."""

    DDIM = "ddim"
    UNIPC = "unipc"
    DPMPP_2M = "dpmpp-2m"
    DPMPP_2M_KARRAS = "dpmpp-2m-karras"
    DPMPP_2M_SDE_KARRAS = "dpmpp-2m-sde-karras"
    EULER = "euler"
    EULER_A = "euler-a"
    LCM = "lcm"

    @classmethod
    def parse(cls, value: str | Sampler) -> Sampler:
        return parse_choice(cls, value, "sampler")


class TimestepSpacing(str, Enum):
    """Which timesteps of the training schedule the steps visit (diffusers' ``timestep_spacing``).
    DEFAULT: each sampler's own, as SD's released scheduler config sets it up (DDIM: leading;
    UniPC, DPM++ 2M, Euler and Euler a: linspace). TRAILING ends on the schedule's last
    timestep, the A1111 web UI's "SGM Uniform": what few-step models such as SDXL-Turbo and
    SDXL-Lightning expect. The Karras samplers and LCM place their steps themselves and take
    DEFAULT only."""

    DEFAULT = "default"
    LEADING = "leading"
    LINSPACE = "linspace"
    TRAILING = "trailing"

    @classmethod
    def parse(cls, value: str | TimestepSpacing) -> TimestepSpacing:
        return parse_choice(cls, value, "timestep spacing")


class ControlMode(str, Enum):
    """The three control modes users know from the A1111 extension."""

    BALANCED = "balanced"  # flat scales, control on both CFG halves
    PROMPT = "prompt"  # "My prompt is more important": soft scales, both halves
    CONTROLNET = "controlnet"  # "ControlNet is more important": soft scales, conditional half only

    @classmethod
    def parse(cls, value: str | ControlMode) -> ControlMode:
        return parse_choice(cls, value, "control mode")

    @property
    def soft(self) -> bool:
        return self is not ControlMode.BALANCED

    @property
    def conditional_only(self) -> bool:
        return self is ControlMode.CONTROLNET


class ResizeMode(str, Enum):
    """How an image of another aspect ratio than the output is fitted to it."""

    STRETCH = "stretch"  # each side scaled on its own: nothing lost, shapes distorted
    CROP = "crop"  # scaled to cover the output, the centre kept: nothing distorted, edges lost
    FILL = "fill"  # scaled to fit inside, centred on a padded canvas: nothing lost or distorted


class PromptSyntax(str, Enum):
    WEIGHTED = "weighted"  # emphasis brackets, BREAK, chunks of 75 tokens
    PLAIN = "plain"  # the text as it is, cut after 75 tokens


class PromptSetting(str, Enum):
    """The paper's four prompt settings (section 4)."""

    USER = "user"  # the user's prompt
    NONE = "none"  # the empty prompt
    DEFAULT = "default"  # "a professional, detailed, high-quality image"
    AUTO = "auto"  # a caption of the condition's source image, from a local BLIP-style captioner


class EvalMetric(str, Enum):
    """How ``controlnet eval`` scores an output against its condition (:mod:`controlnet.evaluation`)."""

    FILL50K = "fill50k"
    OUTLINES = "outlines"
    EDGES = "edges"
    SSIM = "ssim"
    DEPTH = "depth"
    SEGMENTATION = "segmentation"


class HiresUpscaler(str, Enum):
    """How the hires fix enlarges the first pass."""

    LATENT = "latent"  # the latents, bilinearly: no VAE round trip; wants denoise >= 0.5
    IMAGE = "image"  # the decoded pixels (bicubic, antialiased), encoded again: keeps more at low denoise


#: the longest side of an image, in pixels: of an output, the hires fix's enlargement, a condition
#: map and an image resized for an annotator
MAX_SIDE = 4096
#: the most steps the LCM sampler takes: its timesteps are picked from the 50-step schedule the
#: consistency models were distilled on (diffusers' ``original_inference_steps``)
MAX_LCM_STEPS = 50
#: the samplers that place their steps by Karras' noise levels, whatever the timestep spacing
_KARRAS = (Sampler.DPMPP_2M_KARRAS, Sampler.DPMPP_2M_SDE_KARRAS)


def check_spacing(sampler: Sampler | str, spacing: TimestepSpacing | str) -> None:
    """A ValueError unless ``sampler`` can take ``spacing``: the Karras samplers and LCM place
    their steps themselves."""
    sampler, spacing = Sampler.parse(sampler), TimestepSpacing.parse(spacing)
    if spacing is TimestepSpacing.DEFAULT:
        return
    if sampler in _KARRAS:
        raise ValueError(
            f"timestep_spacing {spacing.value!r}: the {sampler.value} sampler places its steps by "
            "Karras' noise levels; for steps spaced otherwise, use dpmpp-2m"
        )
    if sampler is Sampler.LCM:
        raise ValueError(
            f"timestep_spacing {spacing.value!r}: the lcm sampler takes its steps from the "
            f"{MAX_LCM_STEPS}-step schedule the model was distilled on"
        )


def check_steps(sampler: Sampler | str, steps: int, name: str = "steps") -> None:
    """A ValueError naming ``name`` unless ``sampler`` can run ``steps`` steps."""
    if steps < 1:
        raise ValueError(f"{name} must be >= 1, got {steps}")
    if Sampler.parse(sampler) is Sampler.LCM and steps > MAX_LCM_STEPS:
        raise ValueError(
            f"{name}: the lcm sampler takes at most {MAX_LCM_STEPS} steps (its timesteps come from the "
            f"{MAX_LCM_STEPS}-step schedule the model was distilled on), got {steps}"
        )


#: what ``controlnet train`` trains (:mod:`controlnet.training.recipes` says what each is)
OBJECTIVES = ("controlnet", "adapter", "gaussian", "lite", "concat", "vae", "base")
