"""What the transformer (DiT) families share behind the base-model protocol: placement and
offloading, a VAE whose latents are shifted then scaled, 2x2-patch geometry, and the parts every
such model does alike. A family's base class (Flux.1's, SD3's) inherits these and adds its text
encoders, its schedule and its network's call (``predict``).

A subclass holds ``transformer`` (the network that runs every step) and ``vae``, and lists every
network in ``modules()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import Sampler, TimestepSpacing
from ..model.fused import BlockFusion
from ..model.residence import Residence, move, pin
from ..model.twins import twins
from .flow_match import FlowMatchSampler, FlowMatchTraining
from .protocol import Inpaint

__all__ = [
    "ControlledDiT",
    "DiTBase",
    "check_plain_prompts",
    "copy_twins",
    "encode_together",
    "in_precision",
    "pack",
    "shared_fields",
    "spread_residuals",
    "unpack",
]


def shared_fields(config: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The ``fields`` of a base transformer's config a ControlNet shares, JSON-stable (lists, not
    tuples): what a ControlNet records of the model it was made for."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if k in fields}


def in_precision(dtype: torch.dtype, *tensors: Any) -> tuple[Any, ...]:
    """``tensors`` with the floating-point ones in ``dtype`` (the rest, and None, as they are).

    A ControlNet may run in another precision than the locked base beside it - float32 while it
    trains next to a bfloat16 base, and so in that run's validation samples - so it takes its inputs
    in its own precision and gives its residuals back in the base's."""
    return tuple(t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors)


def copy_twins(controlnet: nn.Module, network: nn.Module) -> None:
    """Put a fresh ``controlnet`` on the locked ``network``'s device and dtype and make each of its
    :func:`twins` an exact copy; the zero layers and what has no twin stay as made."""
    like = next(network.parameters())
    controlnet.to(device=like.device, dtype=like.dtype)
    state, own = network.state_dict(), controlnet.state_dict()
    own.update({k: state[src].detach().clone() for k, src in twins(controlnet, network).items()})
    controlnet.load_state_dict(own)


def spread_residuals(res: list[torch.Tensor] | None, blocks: int, repeats: bool = False) -> list[Any]:
    """A ControlNet's residuals as a base of ``blocks`` blocks reads them (diffusers' Flux and
    Qwen-Image transformers): block j gets residual j // ceil(blocks / n), or in turn, j mod n,
    for the ControlNets that repeat theirs (XLabs'); none: none for every block."""
    if res is None:
        return [None] * blocks
    if repeats:
        return [res[j % len(res)] for j in range(blocks)]
    interval = -(-blocks // len(res))
    return [res[j // interval] for j in range(blocks)]


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, channels (C, dy, dx), rows first."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def encode_together(
    base: Any, prompts: Sequence[str], negatives: Sequence[str] | None, syntax: Any, readers: str
) -> tuple[Any, Any]:
    """(prompts, negatives) of a family with one text encoder, encoded in one batch so that both
    come out the same width (a guided batch joins them; each keeps its own length): the
    ``encode_prompts`` of Qwen-Image and Z-Image. ``readers`` names the encoder in refusals."""
    check_plain_prompts([*prompts, *(negatives or [])], syntax, readers)
    both = base.encode_prompt([*prompts, *(negatives or [])])
    if negatives is None:
        return both, None
    n = len(prompts)
    return both.select(range(n)), both.select(range(n, 2 * n))


def check_plain_prompts(prompts: Sequence[str], syntax: Any, readers: str) -> None:
    """Emphasis and BREAK are a CLIP convention these models' encoders do not read: under the
    weighted syntax a prompt that uses them is refused (the plain syntax reads it as text)."""
    from ..choices import PromptSyntax, parse_choice
    from ..text.prompts import parse_emphasis

    if parse_choice(PromptSyntax, syntax, "prompt syntax") is not PromptSyntax.WEIGHTED:
        return
    for p in prompts:
        if any(w != 1.0 for _, w in parse_emphasis(p)):
            raise ValueError(
                f"prompt: emphasis and BREAK are a CLIP convention that {readers} do not read; write the "
                "prompt without them or give --prompt-syntax plain"
            )


class DiTBase(Residence):
    transformer: Any
    vae: Any
    #: the transformer's repeated block classes: what the fast path compiles, one kind at a time
    blocks: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: whether a fixed-shift schedule still takes the levels 1 .. 1/steps (FlowMatchSampler.make)
    linear_sigmas: ClassVar[bool] = False
    #: the family's fused blocks (its ``fused.FUSION``): the transformer's blocks take their
    #: forward, the same arithmetic in fewer kernels
    fusion: ClassVar[BlockFusion | None] = None
    #: the side the family's published models were made for (a file may say its own: ``resolution``)
    family_size: ClassVar[int] = 1024

    def __post_init__(self) -> None:
        for m in self.modules().values():
            m.requires_grad_(False).eval()
        if self.fusion is not None:
            self.fusion.fuse(self.transformer)

    @property
    def guidance_input(self) -> bool:
        """Whether the network reads the guidance scale as an input (guidance-distilled Flux.1)."""
        return False

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    # ------------------------------------------------------------------ placement
    def resident_device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(
        self,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        offload: bool = False,
        companions: Sequence[nn.Module] = (),
    ) -> DiTBase:
        """Move every part, and ``companions`` (the ControlNets) beside the transformer.
        ``offload``: the parts other than the transformer live in pinned CPU memory and visit the
        device while they run (:class:`~controlnet.model.residence.Residence`)."""
        for name, m in self.modules().items():
            away = offload and name != "transformer"
            move(m, "cpu" if away else device, dtype)
            if away:
                pin(m)
        self.keep_company(companions, device, dtype)
        return self

    # ------------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side the model was made for: the ``resolution`` its file's generation settings
        give (a model trained by our commands records its data's), else the family's."""
        return int(self.settings.get("resolution") or self.family_size)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the latents; the image's sides must make whole 2x2 latent patches."""
        step = 2 * self.vae_scale_factor
        if size[0] % step or size[1] % step:
            raise ValueError(f"this model's image sides are multiples of {step} px, got {size[1]}x{size[0]}")
        return size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor

    # ------------------------------------------------------------------ text
    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip != 1:
            raise ValueError("clip skip: this model reads its text encoders as it was trained (clip skip 1)")

    def use_fp8(
        self, controlnets: Sequence[nn.Module], *, device: Any = None, dtype: torch.dtype | None = None
    ) -> None:
        """The linear layers of the transformer's and the ControlNets' blocks in FP8 (model/fp8.py):
        half their weight memory, their products on FP8 tensor cores; idempotent. ``device`` /
        ``dtype``: each block moves there before it is converted, so the full-precision weights are
        never on the device all at once."""
        from ..model.fp8 import blocks_to_fp8

        for network in [self.transformer, *controlnets]:
            blocks_to_fp8(network, self.blocks, device=device, dtype=dtype)

    def with_clip_skip(self, clip_skip: int) -> DiTBase:
        self.check_clip_skip(clip_skip)
        return self

    # ------------------------------------------------------------------ images
    def posterior(self, images: torch.Tensor, *, tiled: bool = False, per_image: bool = True) -> Any:
        return self.visit("vae", lambda: self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist)

    def scaled_sample(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return ((mean + std * noise) - self.latent_shift) * self.latent_scale

    def encode_images(
        self, images: torch.Tensor, generator: Any = None, *, tiled: bool = False
    ) -> torch.Tensor:
        """Latents (scaled and shifted) of images in [-1, 1]: the posterior's mean."""
        return self._latents(images, shifted=True)

    def _latents(self, images: torch.Tensor, *, shifted: bool) -> torch.Tensor:
        """The posterior's mean of images in [-1, 1], scaled, less the VAE's shift if ``shifted``."""
        mean = self.posterior(images).mean
        return ((mean - (self.latent_shift if shifted else 0.0)) * self.latent_scale).to(self.dtype)

    def hint_shifted(self, controlnet: nn.Module) -> bool:
        """Whether ``controlnet`` reads its condition's latents shifted like the image's (every
        family's ControlNets do, unless a family says otherwise)."""
        return True

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W)."""

        def decode() -> torch.Tensor:
            z = latents.to(device=self.device, dtype=self.vae.dtype) / self.latent_scale + self.latent_shift
            return self.vae.decode(z).sample.clamp(-1, 1).float()

        return self.visit("vae", decode)

    def with_vae(self, vae: nn.Module) -> DiTBase:
        from dataclasses import replace

        return replace(self, vae=vae)

    # ------------------------------------------------------------------ denoising
    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def scheduler(
        self,
        sampler: Sampler | str,
        spacing: TimestepSpacing | str = TimestepSpacing.DEFAULT,
        *,
        latent_size: tuple[int, int] | None = None,
    ) -> FlowMatchSampler:
        """Euler over the family's flow-matching schedule (``self.schedule``) for images of
        ``latent_size`` (default: the native size), whose 2x2 patches set a size-dependent shift."""
        h, w = latent_size or self.latent_size((self.native_size,) * 2)
        return FlowMatchSampler.make(
            sampler, spacing, (h // 2) * (w // 2), self.schedule, linear_sigmas=self.linear_sigmas
        )

    def control_hint(
        self, controlnet: nn.Module, condition: torch.Tensor, *, inpaint: Inpaint | None = None
    ) -> torch.Tensor:
        """A condition image in [0, 1] as the ControlNet reads it: its latents, like the image's;
        for an inpainting ControlNet (``mask_channels``), the latents of the image with its masked
        pixels (marked -1, the inpaint map's convention) black, and beside them 1 - the mask at
        the latents' size."""
        masks = getattr(controlnet, "mask_channels", 0)
        shifted = self.hint_shifted(controlnet)
        if not masks:
            return self._latents(condition * 2 - 1, shifted=shifted)
        masked = (condition < 0).any(dim=1, keepdim=True).float()
        latents = self._latents((condition * 2 - 1).clamp(-1, 1), shifted=shifted)
        keep = 1 - F.interpolate(masked, size=latents.shape[-2:])
        return torch.cat([latents, keep.to(latents).expand(-1, masks, -1, -1)], dim=1)

    def compile(self, *, vae: bool = False) -> None:
        from ..model.fastpath import compile_modules
        from ..model.fused import try_qk_kernel

        try_qk_kernel(self.resident_device())  # the compiled blocks then call it as an operator
        compile_modules([self.transformer], regions=self.blocks)
        if vae:
            compile_modules([self.vae.decoder])

    # ------------------------------------------------------------------ training
    def controlled(
        self, controlnet: nn.Module, *, only_mid_control: bool = False, control_type: int | None = None
    ) -> nn.Module:
        """The locked transformer with one trainable ControlNet (:class:`ControlledDiT`)."""
        if only_mid_control:
            raise ValueError("--only-mid-control: a transformer has no middle block; it applies to UNets")
        modes = getattr(controlnet.config, "num_mode", None)
        if modes is not None and not (control_type is not None and 0 <= control_type < modes):
            raise ValueError(
                f"--control-mode: this Union ControlNet has {modes} modes; give the data's, 0-{modes - 1}"
                + ("" if control_type is None else f" (got {control_type})")
            )
        if modes is None and control_type is not None:
            raise ValueError(f"--control-mode {control_type}: the ControlNet is not a Union ControlNet")
        return ControlledDiT(self, controlnet, control_type)

    def decoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        raise ValueError(
            "--no-sd-locked: a transformer base stays locked (it has no decoder half to unlock); "
            "only the ControlNet trains"
        )

    def noise_scheduler(self) -> FlowMatchTraining:
        return FlowMatchTraining(self.schedule)

    def training_guidance(self) -> float:
        """The guidance scale a guidance-distilled network reads while its ControlNet trains: the
        scale the family samples with (Flux.1-dev's 3.5, as diffusers' training recipe)."""
        return float(self.settings.get("guidance", 3.5))


class ControlledDiT(nn.Module):
    """A DiT base with one trainable ControlNet, called as the training loss calls a controlled
    network: ``(latents, timesteps, context, condition images in [0, 1], added_cond_kwargs=)``.
    The condition goes through the base's VAE (:meth:`DiTBase.control_hint`, no gradient), the
    ControlNet's residuals at full strength into the base's blocks (:meth:`predict`)."""

    def __init__(self, base: DiTBase, controlnet: nn.Module, control_type: int | None = None) -> None:
        super().__init__()
        self.base = base
        self.transformer = base.transformer
        self.controlnet = controlnet
        self.control_type = control_type

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        condition: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from ..model.control import Control

        base, cn = self.base, self.controlnet
        with torch.no_grad():
            hint = base.control_hint(cn, condition.to(base.dtype))  # type: ignore[attr-defined]
        added = dict(added_cond_kwargs or {})
        if getattr(base, "guidance_input", False):
            added["guidance"] = torch.full((x.shape[0],), base.training_guidance(), device=x.device)
        control = Control(cn, hint, [1.0] * cn.num_residuals, control_type=self.control_type)
        return base.predict(x, t, context, [control], added=added)  # type: ignore[attr-defined]
