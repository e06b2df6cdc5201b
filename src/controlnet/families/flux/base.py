"""A Flux.1 base model behind the base-model protocol.

Locked parts: diffusers' ``FluxTransformer2DModel`` and ``AutoencoderKL`` (16 latent channels,
scaled and shifted), transformers' CLIP text model (its pooled output) and T5 encoder (its token
sequence, up to ``max_sequence_length`` tokens). Latents are (B, 16, h, w) outside, as every
family's; :meth:`FluxBase.predict` packs them into 2x2 patches of 64 channels with their rotary
positions, runs the ControlNets and the transformer, and unpacks the velocity.

Flux.1-dev is guidance-distilled: the guidance scale is an input of the network
(``guidance_input``), not classifier-free guidance, so a generation runs one batch per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn

from ...choices import PromptSyntax, Sampler, TimestepSpacing, parse_choice
from ...model.control import Control
from ..protocol import PromptEmbeddings
from .controlnet import FLUX_FIELDS, FluxControlNet, FluxControlNetConfig, FluxResiduals
from .schedule import FLUX_SCHEDULE, FlowMatchSampler

__all__ = ["FluxBase", "FluxVariant", "pack", "unpack"]

CLIP_LENGTH = 77


class FluxVariant(Enum):
    DEV = "flux-dev"  # reads a guidance scale
    SCHNELL = "flux-schnell"  # timestep-distilled, no guidance input

    @property
    def label(self) -> str:
        return {"flux-dev": "Flux.1-dev", "flux-schnell": "Flux.1-schnell"}[self.value]


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, channels (C, dy, dx), rows first."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rotary positions (0, row, column) of the packed tokens of (h, w) latents."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class FluxBase:
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: nn.Module  # CLIPTextModel: the pooled prompt
    text_encoder_2: nn.Module  # T5EncoderModel: the prompt's tokens
    tokenizer: Any
    tokenizer_2: Any
    max_sequence_length: int = 512
    schedule: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULE))
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.modules().values():
            m.requires_grad_(False).eval()

    @property
    def family(self) -> FluxVariant:
        return FluxVariant.DEV if self.guidance_input else FluxVariant.SCHNELL

    @property
    def guidance_input(self) -> bool:
        """The guidance scale is an input of the network (guidance distillation), not CFG."""
        return bool(self.transformer.config.guidance_embeds)

    # ------------------------------------------------------------------ placement
    def modules(self) -> dict[str, nn.Module]:
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    def to(self, device: Any = None, dtype: torch.dtype | None = None, *, offload: bool = False) -> FluxBase:
        for name, m in self.modules().items():
            where = "cpu" if offload and name != "transformer" else device
            m.to(device=where, dtype=dtype)
        return self

    @contextlib.contextmanager
    def visiting(self, *names: str) -> Iterator[None]:
        """The named parts on the transformer's device within the block (offloaded ones return)."""
        mods = self.modules()
        away = [(mods[n], next(mods[n].parameters()).device) for n in names]
        away = [(m, home) for m, home in away if home != self.device]
        for m, _ in away:
            m.to(self.device)
        try:
            yield
        finally:
            for m, home in away:
                m.to(home)

    # ------------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return 1024

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
            raise ValueError(f"a Flux image's sides are multiples of {step} px, got {size[1]}x{size[0]}")
        return size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor

    # ------------------------------------------------------------------ text
    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip != 1:
            raise ValueError("clip skip: Flux reads its text encoders' last layers only (clip skip 1)")

    def with_clip_skip(self, clip_skip: int) -> FluxBase:
        self.check_clip_skip(clip_skip)
        return self

    @torch.no_grad()
    def encode_prompt(
        self, prompts: Sequence[str], *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        """CLIP's pooled vector ("pooled") and T5's token sequence (the context) of each prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip = self.tokenizer(
            prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        t5 = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with self.visiting("text_encoder", "text_encoder_2"):
            pooled = self.text_encoder(clip.to(self.device), output_hidden_states=False).pooler_output
            context = self.text_encoder_2(t5.to(self.device), output_hidden_states=False)[0]
        return PromptEmbeddings(context.to(self.dtype), {"pooled": pooled.to(self.dtype)})

    def encode_prompts(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        *,
        size: tuple[int, int] | None = None,
        syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """The prompts as they are (T5 reads no emphasis: a prompt using it is refused); negatives
        only when guidance is classifier-free (a model without a guidance input)."""
        from ...text.prompts import parse_emphasis

        if parse_choice(PromptSyntax, syntax, "prompt syntax") is PromptSyntax.WEIGHTED:
            for p in [*prompts, *(negatives or [])]:
                if any(w != 1.0 for _, w in parse_emphasis(p)):
                    raise ValueError(
                        "prompt: emphasis and BREAK are a CLIP convention that Flux's T5 does not read; "
                        "write the prompt without them or give --prompt-syntax plain"
                    )
        cond = self.encode_prompt(prompts)
        uncond = None if negatives is None or self.guidance_input else self.encode_prompt(negatives)
        return cond, uncond

    # ------------------------------------------------------------------ images
    def posterior(self, images: torch.Tensor, *, tiled: bool = False, per_image: bool = True) -> Any:
        with self.visiting("vae"):
            return self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist

    def scaled_sample(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return ((mean + std * noise) - self.latent_shift) * self.latent_scale

    def encode_images(
        self, images: torch.Tensor, generator: Any = None, *, tiled: bool = False
    ) -> torch.Tensor:
        """Latents (scaled and shifted) of images in [-1, 1]: the posterior's mean."""
        mean = self.posterior(images).mean
        return ((mean - self.latent_shift) * self.latent_scale).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W)."""
        with self.visiting("vae"):
            z = latents.to(device=self.device, dtype=self.vae.dtype) / self.latent_scale + self.latent_shift
            return self.vae.decode(z).sample.clamp(-1, 1).float()

    def with_vae(self, vae: nn.Module) -> FluxBase:
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
        h, w = latent_size or self.latent_size((self.native_size,) * 2)
        return FlowMatchSampler.make(sampler, spacing, (h // 2) * (w // 2), self.schedule)

    def control_hint(self, controlnet: nn.Module, condition: torch.Tensor) -> torch.Tensor:
        """A condition image in [0, 1] as the ControlNet reads it: its latents, like the image's."""
        return self.encode_images(condition * 2 - 1)

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
        """The velocity for latents ``x`` at timestep ``t`` (0-1000) with each control's residuals,
        scaled and summed, added to the transformer's blocks."""
        added = dict(added or {})
        b, _, h, w = x.shape
        tokens = pack(x)
        ids = image_ids(h, w, x.device, x.dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
        timestep = t.to(x.dtype).expand(b) / 1000
        guidance = added.get("guidance")
        kw = {
            "encoder_hidden_states": context,
            "pooled_projections": added["pooled"],
            "timestep": timestep,
            "img_ids": ids,
            "txt_ids": txt_ids,
            "guidance": guidance,
        }
        each = []
        for c in controls:
            if c.region is not None or c.conditional_only:
                raise ValueError(
                    "Flux controls act everywhere and on the whole batch (no region, no CFG half)"
                )
            mode = None if c.control_type is None else torch.full((b, 1), c.control_type, device=x.device)
            res = c.controlnet(tokens, pack(c.hint).expand(b, -1, -1), mode=mode, **kw)
            each.append(_scaled(res, c.scales))
        blocks = (len(self.transformer.transformer_blocks), len(self.transformer.single_transformer_blocks))
        total = _sum_residuals(each, blocks)
        samples = {}
        if total is not None:
            samples = {
                "controlnet_block_samples": total.double,
                "controlnet_single_block_samples": total.single,
            }
        out = self.transformer(
            hidden_states=tokens,
            **{k: v for k, v in kw.items() if k != "guidance" or self.guidance_input},
            **samples,
        ).sample
        return unpack(out, h, w)

    def compile(self, *, vae: bool = False) -> None:
        from ...model.fastpath import compile_modules

        compile_modules([self.transformer])
        if vae:
            compile_modules([self.vae.decoder])

    # ------------------------------------------------------------------ its ControlNets
    def new_controlnet(self, config: Any = None) -> FluxControlNet:
        return FluxControlNet.from_transformer(self.transformer, config or FluxControlNetConfig())

    def check_controlnet(self, controlnet: nn.Module, *, controlnet_name: str, base_name: str) -> None:
        if not isinstance(controlnet, FluxControlNet):
            raise ValueError(f"{controlnet_name} is not a Flux ControlNet, and {base_name} is Flux.1")
        ours = {
            k: v for k, v in self.transformer.config.items() if k in FLUX_FIELDS and k != "guidance_embeds"
        }
        theirs = {k: v for k, v in controlnet.transformer_config.items() if k in ours}
        differ = [
            f"{k} {theirs[k]} vs {ours[k]}"
            for k in ours
            if k in theirs and list(_seq(theirs[k])) != list(_seq(ours[k]))
        ]
        if differ:
            raise ValueError(
                f"{controlnet_name} was made for another transformer than {base_name}: {', '.join(differ)}"
            )

    # ------------------------------------------------------------------ training (issue 32)
    def controlled(self, controlnet: nn.Module, *, only_mid_control: bool = False) -> nn.Module:
        raise ValueError("training Flux ControlNets is not supported yet")

    def decoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        raise ValueError("training Flux models is not supported yet")

    def noise_scheduler(self) -> Any:
        raise ValueError("training Flux models is not supported yet")


def _seq(v: Any) -> Any:
    return v if isinstance(v, (list, tuple)) else [v]


def _scaled(res: FluxResiduals, scales: Sequence[float]) -> FluxResiduals:
    n = len(res.double or [])
    double = None if res.double is None else [r * s for r, s in zip(res.double, scales[:n])]
    single = None if res.single is None else [r * s for r, s in zip(res.single, scales[n:])]
    return FluxResiduals(double, single)


def _spread(res: list[torch.Tensor] | None, blocks: int) -> list[torch.Tensor | None]:
    """A ControlNet's residuals as the base reads them: block j gets residual j // ceil(blocks / n)."""
    if res is None:
        return [None] * blocks
    interval = -(-blocks // len(res))
    return [res[j // interval] for j in range(blocks)]


def _sum_residuals(each: list[FluxResiduals], blocks: tuple[int, int]) -> FluxResiduals | None:
    """Several ControlNets' residuals, each spread over the base's blocks, summed block by block
    (ControlNets that copy different numbers of blocks add up too); one ControlNet's as they are."""
    if len(each) <= 1:
        return each[0] if each else None

    def total(parts: list[list[torch.Tensor] | None], n: int) -> list[torch.Tensor] | None:
        if all(p is None for p in parts):
            return None
        out = []
        for j in range(n):
            at = [r for r in (_spread(p, n)[j] for p in parts) if r is not None]
            out.append(at[0] if len(at) == 1 else torch.stack(at).sum(0))
        return out

    return FluxResiduals(
        total([r.double for r in each], blocks[0]), total([r.single for r in each], blocks[1])
    )
