"""A Stable Diffusion 3 / 3.5 base model behind the base-model protocol.

Locked parts: diffusers' ``SD3Transformer2DModel`` (MMDiT) and ``AutoencoderKL`` (16 latent
channels, shifted and scaled), CLIP-L and CLIP-G (``CLIPTextModelWithProjection``: their
penultimate layers side by side, their projected pooled outputs joined) and optionally T5 (its
tokens after CLIP's, CLIP's zero-padded to T5's width; without T5 the model reads zeros in its
place, as SD3 was trained to). Guidance is classifier-free (both halves in one batch); the
schedule is flow matching with a fixed shift of 3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import nn

from ...choices import PromptSyntax
from ...model.control import Control, region_tokens
from ...model.fastpath import run_concurrently
from ..dit import DiTBase, check_plain_prompts
from ..protocol import PromptEmbeddings, controlnet_config
from .controlnet import SD3_BLOCKS, SD3_FIELDS, SD3ControlNet, SD3ControlNetConfig
from .fused import FUSION

__all__ = ["SD3_SCHEDULE", "SD3Base", "SD3Variant"]

CLIP_LENGTH = 77
#: SD3's scheduler config (diffusers' scheduler_config.json of SD3 and SD3.5)
SD3_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


class SD3Variant(Enum):
    SD3 = "sd3"

    @property
    def label(self) -> str:
        return "SD3 / SD3.5"


@dataclass
class SD3Base(DiTBase):
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoder: nn.Module  # CLIP-L with projection
    text_encoder_2: nn.Module  # CLIP-G with projection
    text_encoder_3: nn.Module | None  # T5, or None (zeros in its place)
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any = None
    max_sequence_length: int = 256
    schedule: dict[str, Any] = field(default_factory=lambda: dict(SD3_SCHEDULE))
    settings: dict[str, Any] = field(default_factory=dict)
    blocks = SD3_BLOCKS
    fusion = FUSION
    family = SD3Variant.SD3

    def modules(self) -> dict[str, nn.Module]:
        mods = {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }
        if self.text_encoder_3 is not None:
            mods["text_encoder_3"] = self.text_encoder_3
        return mods

    # ------------------------------------------------------------------ text
    def _clip(
        self, encoder: nn.Module, tokenizer: Any, prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(
            prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # the penultimate layer, the projected pooled vector

    def text_windows(self) -> list[tuple[str, Any, int]]:
        """CLIP-L and CLIP-G (one window each), and T5 (its end token takes one place) if present."""
        clip = [("CLIP-L and CLIP-G", self.tokenizer, CLIP_LENGTH - 2)]
        t5 = (
            [("T5", self.tokenizer_3, self.max_sequence_length - 1)]
            if self.text_encoder_3 is not None
            else []
        )
        return clip + t5

    @torch.no_grad()
    def encode_prompt(
        self, prompts: Sequence[str], *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        width = self.transformer.config.joint_attention_dim
        with self.visiting("text_encoder", "text_encoder_2", "text_encoder_3"):
            h1, p1 = self._clip(self.text_encoder, self.tokenizer, prompts)
            h2, p2 = self._clip(self.text_encoder_2, self.tokenizer_2, prompts)
            if self.text_encoder_3 is None:
                t5 = torch.zeros(
                    len(prompts), self.max_sequence_length, width, device=self.device, dtype=h1.dtype
                )
            else:
                ids = self.tokenizer_3(
                    prompts,
                    padding="max_length",
                    max_length=self.max_sequence_length,
                    truncation=True,
                    add_special_tokens=True,
                    return_tensors="pt",
                ).input_ids
                t5 = self.text_encoder_3(ids.to(self.device))[0]
        clip = torch.cat([h1, h2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        context = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        pooled = torch.cat([p1, p2], dim=-1)
        return PromptEmbeddings(context.to(self.dtype), {"pooled": pooled.to(self.dtype)})

    def encode_prompts(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        *,
        size: tuple[int, int] | None = None,
        syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        check_plain_prompts([*prompts, *(negatives or [])], syntax, "SD3's text encoders")
        cond = self.encode_prompt(prompts)
        return cond, None if negatives is None else self.encode_prompt(negatives)

    # ------------------------------------------------------------------ denoising
    def hint_shifted(self, controlnet: nn.Module) -> bool:
        """The published plain ControlNets that read zeros for the pooled text (InstantX's) were
        trained on condition latents without the VAE's shift, as diffusers feeds them; inpainting
        ones on shifted latents, like every other."""
        return not (getattr(controlnet.config, "zero_pooled", False) and not controlnet.mask_channels)

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
        """The velocity for latents ``x`` at timestep ``t`` (0-1000), each control's residuals
        scaled and summed onto the joint blocks' image tokens."""
        b = x.shape[0]
        pooled = (added or {})["pooled"]
        timestep = t.to(x.dtype).expand(b)
        tokens = None
        if any(not c.controlnet.config.own_pos_embed for c in controls):
            tokens = self.transformer.pos_embed(x)  # what SD3.5 Large's ControlNets read

        def residuals(c: Control) -> list[torch.Tensor]:
            cn = c.controlnet
            hidden = x if cn.config.own_pos_embed else tokens
            text = context if cn.config.reads_text else None
            rows = slice(b // 2, b) if c.conditional_only and cfg_batch else slice(0, b)
            n = rows.stop - rows.start
            hint = c.hint.expand(n, *c.hint.shape[1:]) if c.hint.shape[0] == 1 else c.hint
            res = cn(
                hidden[rows],
                hint,
                pooled_projections=pooled[rows],
                timestep=timestep[rows],
                encoder_hidden_states=None if text is None else text[rows],
            )
            res = [r * s for r, s in zip(res, c.scales)]
            if n < b:  # the conditional half only ("ControlNet is more important"): none on the other
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            if c.region is not None:
                p = self.transformer.config.patch_size
                weight = region_tokens(c.region, (x.shape[-2] // p, x.shape[-1] // p), res[0].dtype)
                res = [r * weight for r in res]
            return res

        fns = [partial(residuals, c) for c in controls]
        each = run_concurrently(fns, x.device) if concurrent else [fn() for fn in fns]
        samples = _summed(each, len(self.transformer.transformer_blocks))
        return self.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            block_controlnet_hidden_states=samples,
        ).sample

    # ------------------------------------------------------------------ its ControlNets
    def new_controlnet(self, config: Any = None) -> SD3ControlNet:
        config = controlnet_config(SD3ControlNetConfig, config, "SD3")
        return SD3ControlNet.from_transformer(self.transformer, config)

    def check_controlnet(self, controlnet: nn.Module, *, controlnet_name: str, base_name: str) -> None:
        if not isinstance(controlnet, SD3ControlNet):
            raise ValueError(f"{controlnet_name} is not an SD3 ControlNet, and {base_name} is SD3")
        ours = {k: v for k, v in self.transformer.config.items() if k in SD3_FIELDS}
        theirs = controlnet.transformer_config
        differ = [
            f"{k} {theirs[k]} vs {ours[k]}"
            for k in ("attention_head_dim", "num_attention_heads", "in_channels", "patch_size")
            if k in theirs and theirs[k] != ours.get(k)
        ]
        if differ:
            raise ValueError(
                f"{controlnet_name} was made for another transformer than {base_name}: {', '.join(differ)}"
            )


def _summed(each: list[list[torch.Tensor]], blocks: int) -> list[torch.Tensor] | None:
    """Several ControlNets' residuals, each spread over the base's blocks the way the base reads
    one ControlNet's (block j takes residual ``int(j / (blocks / n))``), summed block by block."""
    if len(each) <= 1:
        return each[0] if each else None

    def spread(res: list[torch.Tensor]) -> list[torch.Tensor]:
        interval = blocks / len(res)
        return [res[int(j / interval)] for j in range(blocks)]

    spreads = [spread(r) for r in each]
    return [torch.stack([s[j] for s in spreads]).sum(0) for j in range(blocks)]
