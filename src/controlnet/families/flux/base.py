"""A Flux.1 base model behind the base-model protocol.

Locked parts: diffusers' ``FluxTransformer2DModel`` and ``AutoencoderKL`` (16 latent channels,
scaled and shifted), transformers' CLIP text model (its pooled output) and T5 encoder (its token
sequence, up to ``max_sequence_length`` tokens). Latents are (B, 16, h, w) outside, as every
family's; :meth:`FluxBase.predict` packs them into 2x2 patches of 64 channels with their rotary
positions, runs the ControlNets and the transformer, and unpacks the velocity.

Flux.1-dev is guidance-distilled: the guidance scale is an input of the network
(``guidance_input``), so a generation runs one batch per step, unless true guidance (classifier-
free, against the negative prompt) is asked for beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn

from ...choices import PromptSyntax
from ...model import fused
from ...model.control import Control, region_tokens
from ...model.fastpath import run_concurrently
from ..dit import DiTBase, check_plain_prompts, spread_residuals
from ..protocol import Inpaint, PromptEmbeddings, check_hint_scale, controlnet_config
from .controlnet import FLUX_BLOCKS, FLUX_FIELDS, FluxControlNet, FluxControlNetConfig, FluxResiduals
from .fused import FUSION
from .patches import image_ids, pack, text_ids, unpack
from .schedule import FLUX_SCHEDULE

__all__ = ["FluxBase", "FluxVariant"]

CLIP_LENGTH = 77


class FluxVariant(Enum):
    DEV = "flux-dev"  # reads a guidance scale
    SCHNELL = "flux-schnell"  # timestep-distilled, no guidance input

    @property
    def label(self) -> str:
        return {"flux-dev": "Flux.1-dev", "flux-schnell": "Flux.1-schnell"}[self.value]


@dataclass
class FluxBase(DiTBase):
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: nn.Module  # CLIPTextModel: the pooled prompt
    text_encoder_2: nn.Module  # T5EncoderModel: the prompt's tokens
    tokenizer: Any
    tokenizer_2: Any
    max_sequence_length: int = 512
    schedule: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULE))
    settings: dict[str, Any] = field(default_factory=dict)
    blocks = FLUX_BLOCKS
    fusion = FUSION

    @property
    def family(self) -> FluxVariant:
        return FluxVariant.DEV if self.guidance_input else FluxVariant.SCHNELL

    @property
    def guidance_input(self) -> bool:
        """The guidance scale is an input of the network (guidance distillation), not CFG."""
        return bool(self.transformer.config.guidance_embeds)

    def modules(self) -> dict[str, nn.Module]:
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    # ------------------------------------------------------------------ text
    def text_windows(self) -> list[tuple[str, Any, int]]:
        """CLIP-L (its pooled vector) and T5 (the token sequence; its end token takes one place)."""
        return [
            ("CLIP-L", self.tokenizer, CLIP_LENGTH - 2),
            ("T5", self.tokenizer_2, self.max_sequence_length - 1),
        ]

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
        """The prompts as they are (T5 reads no emphasis: a prompt using it is refused), and the
        negatives when asked for (true classifier-free guidance)."""
        check_plain_prompts([*prompts, *(negatives or [])], syntax, "Flux's T5")
        cond = self.encode_prompt(prompts)
        return cond, None if negatives is None else self.encode_prompt(negatives)

    # ------------------------------------------------------------------ denoising
    def control_hint(
        self, controlnet: nn.Module, condition: torch.Tensor, *, inpaint: Inpaint | None = None
    ) -> torch.Tensor:
        """The condition's latents (InstantX's convention), or for a ControlNet with a pixel hint
        encoder (XLabs') the image itself in [-1, 1]."""
        if getattr(controlnet.config, "pixel_hint_channels", None) is not None:
            return (condition * 2 - 1).to(self.dtype)
        return super().control_hint(controlnet, condition)

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
        txt_ids = text_ids(context.shape[1], x.device, x.dtype)
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

        def residuals(c: Control) -> list[torch.Tensor]:
            """One control's residuals, double blocks then single blocks, as one list."""
            rows = slice(b // 2, b) if c.conditional_only and cfg_batch else slice(0, b)
            n = rows.stop - rows.start
            pixels = c.controlnet.config.pixel_hint_channels is not None
            hint = c.hint.expand(n, *c.hint.shape[1:]) if pixels else pack(c.hint).expand(n, -1, -1)
            part = {
                k: (v[rows] if torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v)
                for k, v in kw.items()
            }
            res = _scaled(c.controlnet(tokens[rows], hint, mode=c.control_type, **part), c.scales)
            flat = [*(res.double or []), *(res.single or [])]
            if n < b:  # the conditional half only ("ControlNet is more important"): none on the other
                flat = [torch.cat([torch.zeros_like(r), r]) for r in flat]
            if c.region is not None:  # where the control acts, averaged over each token's patch
                weight = region_tokens(c.region, (h // 2, w // 2), x.dtype)
                flat = [r * weight for r in flat]
            return flat

        fns = [partial(residuals, c) for c in controls]
        flats = run_concurrently(fns, x.device) if concurrent else [fn() for fn in fns]
        each = []
        for c, flat in zip(controls, flats):
            n = c.controlnet.config.num_layers
            res = FluxResiduals(flat[:n] or None, flat[n:] or None)
            each.append((res, c.controlnet.config.repeats))
        double, single = self.transformer.transformer_blocks, self.transformer.single_transformer_blocks
        total = _sum_residuals(each, (len(double), len(single)))
        samples: dict[str, Any] = {}
        adding = contextlib.nullcontext()
        if total is not None and fused.takes_residuals([*double, *single]):  # in the blocks' last sums
            spread = spread_residuals(total.double, len(double)) + spread_residuals(total.single, len(single))
            adding = fused.adding_residuals([*double, *single], spread)
        elif total is not None:
            samples = {
                "controlnet_block_samples": total.double,
                "controlnet_single_block_samples": total.single,
            }
        with adding:
            out = self.transformer(
                hidden_states=tokens,
                **{k: v for k, v in kw.items() if k != "guidance" or self.guidance_input},
                **samples,
            ).sample
        return unpack(out, h, w)

    # ------------------------------------------------------------------ its ControlNets
    def new_controlnet(self, config: Any = None) -> FluxControlNet:
        """A fresh ControlNet; a pixel hint encoder scales the condition down as this VAE does
        unless ``config`` says otherwise."""
        own = {"pixel_hint_scale": self.vae_scale_factor}
        return FluxControlNet.from_transformer(
            self.transformer, controlnet_config(FluxControlNetConfig, config, "Flux", own)
        )

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
        if controlnet.config.pixel_hint_channels is not None:
            check_hint_scale(
                controlnet.config.pixel_hint_scale,
                self.vae_scale_factor,
                subject=f"{controlnet_name}'s hint encoder",
                base_name=base_name,
            )


def _seq(v: Any) -> Any:
    return v if isinstance(v, (list, tuple)) else [v]


def _scaled(res: FluxResiduals, scales: Sequence[float]) -> FluxResiduals:
    n = len(res.double or [])
    double = None if res.double is None else [r * s for r, s in zip(res.double, scales[:n])]
    single = None if res.single is None else [r * s for r, s in zip(res.single, scales[n:])]
    return FluxResiduals(double, single)


def _sum_residuals(each: list[tuple[FluxResiduals, bool]], blocks: tuple[int, int]) -> FluxResiduals | None:
    """The ControlNets' residuals, each spread over the base's blocks its own way and summed block
    by block (ControlNets that copy different numbers of blocks add up too); one ControlNet that
    reads the base's way, as it is."""
    if not each:
        return None
    if len(each) == 1 and not each[0][1]:
        return each[0][0]

    def total(parts: list[tuple[list[torch.Tensor] | None, bool]], n: int) -> list[torch.Tensor] | None:
        if all(p is None for p, _ in parts):
            return None
        spreads = [spread_residuals(p, n, repeats) for p, repeats in parts]
        out = []
        for j in range(n):
            at = [s[j] for s in spreads if s[j] is not None]
            out.append(at[0] if len(at) == 1 else torch.stack(at).sum(0))
        return out

    double = total([(r.double, rep) for r, rep in each], blocks[0])
    single = total([(r.single, rep) for r, rep in each], blocks[1])
    return FluxResiduals(double, single)
