"""What generation, training and the shells need from a base model: one protocol for every family.

A family (the SD UNets today; transformer families next) is a plug-in: a class that implements
:class:`BaseModel` (its networks, text encoders, VAE and scheduler family behind these methods),
its configs, its checkpoint layouts, and a :class:`~controlnet.families.Family` entry in the
registry. Nothing above the families asks which family a model is: generation calls
``base.encode_prompts``, ``base.scheduler``, ``base.predict`` and the VAE methods; the command
line, the API and the web app only name files, which the registry loads.

Latents are always (B, C, h, w) here; a family whose network reads tokens (2x2-packed latents,
rotary positions) packs and unpacks inside :meth:`BaseModel.predict` and its ControlNet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from ..choices import PromptSyntax, Sampler, TimestepSpacing
    from ..model.control import Control

__all__ = ["BaseModel", "Inpaint", "PromptEmbeddings", "controlnet_config"]


@dataclass(frozen=True)
class Inpaint:
    """The image a request edits and its mask, at the output size, as some ControlNets read them
    beside their condition (Z-Image's Union 2.x ControlNets): ``image`` (1, 3, H, W) in [0, 1],
    ``mask`` (1, 1, H, W), 1 where the image is to be repainted."""

    image: torch.Tensor
    mask: torch.Tensor


@dataclass
class PromptEmbeddings:
    """What a denoising network reads from a batch of prompts.

    context: (B, L, D) the text tokens it attends to.
    added: further conditions by name, batch B first (SDXL's pooled text embedding and size ids;
        a transformer's pooled projection), or None. One on the CPU is host data the network's
        Python code reads (Z-Image's caption lengths), not a tensor it computes with.
    """

    context: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    @staticmethod
    def cat(parts: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        names = {tuple(sorted(p.added)) if p.added is not None else None for p in parts}
        if len(names) > 1:  # a condition some rows lack cannot be made up for them
            raise ValueError(
                f"prompt embeddings to join carry different conditions: {sorted(map(str, names))}"
            )
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}  # type: ignore[index]
        return PromptEmbeddings(torch.cat([p.context for p in parts]), added)

    def repeat(self, n: int) -> PromptEmbeddings:
        """Each row repeated ``n`` times in a row (prompt i -> samples i*n .. i*n+n-1)."""
        return self.select([i for i in range(len(self)) for _ in range(n)])

    def select(self, rows: Sequence[int]) -> PromptEmbeddings:
        """The embeddings of ``rows``, in that order (a row may be taken several times)."""
        index = torch.tensor(rows, dtype=torch.long)
        added = None if self.added is None else {k: v[index.to(v.device)] for k, v in self.added.items()}
        return PromptEmbeddings(self.context[index.to(self.context.device)], added)


def controlnet_config(cls: Any, value: Any, label: str, defaults: Mapping[str, Any] | None = None) -> Any:
    """A family's ControlNet configuration (a dataclass with ``from_dict``) from ``value``: an
    instance as it is, None for the defaults, or a mapping of its fields (``controlnet train
    --controlnet-config``); ValueError naming unknown fields and the ones ``label`` takes.
    ``defaults``: the base's own values of fields (what its VAE implies) where ``value`` gives none."""
    from dataclasses import fields

    if isinstance(value, cls):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"a {label} ControlNet's configuration is a {cls.__name__} or a mapping")
    value = {**(defaults or {}), **(value or {})}
    if not value:
        return cls()
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(
            f"ControlNet configuration: {', '.join(unknown)} is not a field of a {label} ControlNet "
            f"(it takes {', '.join(names)})"
        )
    return cls.from_dict(value)


def check_hint_scale(scale: int, vae_scale: int, *, subject: str, base_name: str, to: str = "") -> None:
    """CheckpointError unless what reads a condition image (``subject``: a ControlNet's hint
    encoder, an adapter) scales it down ``vae_scale`` times, as the base's VAE scales images."""
    from ..errors import CheckpointError

    if scale != vae_scale:
        raise CheckpointError(
            f"{subject} scales the condition down {scale}x{to}, but {base_name}'s VAE {vae_scale}x: "
            "it was made for another VAE"
        )


@runtime_checkable
class BaseModel(Protocol):
    """A locked text-to-image model, as generation and training use it.

    ``family`` names the family and variant (an Enum member: ``.value`` for files, ``.label`` for
    people).
    """

    family: Any

    # ---------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def to(
        self,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        offload: bool = False,
        companions: Sequence[nn.Module] = (),
    ) -> BaseModel:
        """Move every part, and ``companions`` (a generation's ControlNets) beside the network that
        runs every step. ``offload``: the parts that run once per generation stay in CPU memory and
        visit the device while they run; if one would not fit beside the every-step networks, those
        step off for its visit (:mod:`controlnet.model.residence`)."""
        ...

    def modules(self) -> dict[str, nn.Module]:
        """Every network by name."""
        ...

    # ---------------------------------------------------------------- geometry
    @property
    def native_size(self) -> int:
        """The side in pixels the model was made for."""
        ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def latent_scale(self) -> float: ...

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the latents of images of ``size`` (H, W)."""
        ...

    # ---------------------------------------------------------------- text
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        *,
        size: tuple[int, int] | None = None,
        syntax: PromptSyntax | str = ...,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """Each sample's prompt and (not None: guidance needs them) negative prompt, of one length."""
        ...

    def encode_prompt(
        self, prompts: Sequence[str], *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        """Each prompt as training reads it: the text as it is, in the encoder's window."""
        ...

    def text_windows(self) -> list[tuple[str, Any, int]]:
        """Each text encoder's name, tokenizer and how many text tokens of a caption it reads in
        one window (what training and plain prompts read; the rest is cut)."""
        ...

    def check_clip_skip(self, clip_skip: int) -> None:
        """ValueError unless the model can read its text encoder ``clip_skip`` layers from the end."""
        ...

    def use_fp8(
        self, controlnets: Sequence[nn.Module], *, device: Any = None, dtype: torch.dtype | None = None
    ) -> None:
        """Store the network's (and ``controlnets``') weights in float8 and multiply in FP8, in
        place, each block moved to ``device`` / ``dtype`` first; ValueError where the family has
        no FP8 path."""
        ...

    def with_clip_skip(self, clip_skip: int) -> BaseModel: ...

    # ---------------------------------------------------------------- images
    def posterior(self, images: torch.Tensor, *, tiled: bool = False, per_image: bool = True) -> Any:
        """The VAE's posterior over the latents of images in [-1, 1] (``.mean``, ``.std``)."""
        ...

    def scaled_sample(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def encode_images(
        self, images: torch.Tensor, generator: Any = None, *, tiled: bool = False
    ) -> torch.Tensor: ...

    def decode_latents(self, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor: ...

    def with_vae(self, vae: nn.Module) -> BaseModel: ...

    # ---------------------------------------------------------------- denoising
    @property
    def guidance_input(self) -> bool:
        """Whether the network reads the guidance scale as an input (guidance-distilled models):
        then generation passes it as ``added["guidance"]`` and runs no classifier-free guidance."""
        ...

    @property
    def denoiser(self) -> nn.Module:
        """The network that runs every step (what is compiled, and what keeps the step graphs)."""
        ...

    def scheduler(
        self,
        sampler: Sampler | str,
        spacing: TimestepSpacing | str,
        *,
        latent_size: tuple[int, int] | None = None,
    ) -> SchedulerMixin:
        """A fresh scheduler of the model's family for ``sampler``, its steps spaced by ``spacing``
        (``latent_size``: of the image to make, for schedules that shift with the size)."""
        ...

    def control_hint(
        self, controlnet: nn.Module, condition: torch.Tensor, *, inpaint: Inpaint | None = None
    ) -> torch.Tensor:
        """A condition image (B, C, H, W) in [0, 1] as ``controlnet`` reads it (its hint
        encoder's features, or latents of the model's VAE), computed once per generation.
        ``inpaint``: the request's image to edit and its mask, for ControlNets that read them
        beside their condition (the others ignore it)."""
        ...

    def predict(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        controls: Sequence[Control] = (),
        *,
        added: Mapping[str, torch.Tensor] | None = None,
        cfg_batch: bool = False,
        concurrent: bool = False,
    ) -> torch.Tensor:
        """The network's prediction for latents ``x`` at timestep ``t`` with the controls' residuals
        injected (``cfg_batch``: the batch is [unconditional; conditional] halves)."""
        ...

    def compile(self, *, vae: bool = False) -> None:
        """Compile the network that runs every step (``vae``: the VAE's decoder too)."""
        ...

    # ---------------------------------------------------------------- its ControlNets
    def new_controlnet(self, config: Any = None) -> nn.Module:
        """A fresh ControlNet for this model: its trainable copy equals the model's part exactly.
        ``config``: the family's configuration, a mapping of its fields, or None (defaults)."""
        ...

    def check_controlnet(self, controlnet: nn.Module, *, controlnet_name: str, base_name: str) -> None:
        """ValueError naming both unless ``controlnet`` was made for this model's architecture."""
        ...

    # ---------------------------------------------------------------- training
    def controlled(
        self, controlnet: nn.Module, *, only_mid_control: bool = False, control_type: int | None = None
    ) -> nn.Module:
        """The locked network with one trainable ControlNet: the module a training loss is taken on,
        called as ``(latents, timesteps, context, condition images, added_cond_kwargs=)``
        (``control_type``: a Union ControlNet's mode for the data)."""
        ...

    def decoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The locked network's parameters that training may unlock (``sd_locked=False``)."""
        ...

    def noise_scheduler(self) -> Any:
        """The training-time noising: ``draw_noised(latents, noise, draws)`` -> (noisy latents,
        timesteps, regression target), its timesteps from the training loop's ``draws``."""
        ...
