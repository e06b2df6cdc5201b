"""A Z-Image base model behind the base-model protocol (issue 34).

Locked parts: diffusers' ``ZImageTransformer2DModel`` (a single-stream transformer: image and
caption refined apart, then one sequence of both through its main layers), the 16-channel
``AutoencoderKL`` of Flux.1, and Qwen3 through transformers as the text encoder: each prompt in
the tokenizer's chat template (or, for a tokenizer without one, the template Qwen3's renders), its
second-to-last hidden states, each prompt's own tokens only - captions keep their own lengths, so
their lengths travel with the embeddings as host data (``text_lengths``, on the CPU).

Sampling: Euler over the levels 1 .. 1/steps shifted by 3; the network reads time as 1 at the
clean end and predicts the negative velocity. Guidance here is the usual scale (1: none): Z-Image's
pipelines count from 0 (``pos + g (pos - neg)``), which is our scale g + 1. The ControlNets run on
every row, each reading its own row's caption (not only the conditional half).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
from torch import nn

from ...choices import PromptSyntax
from ...model.control import Control, region_tokens
from ..dit import DiTBase, encode_together, shared_fields
from ..protocol import Inpaint, PromptEmbeddings, controlnet_config
from .controlnet import ZIMAGE_FIELDS, ZImageControlNet, ZImageControlNetConfig
from .fused import FUSION
from .sequence import finish, patch_tokens, prepare

__all__ = ["PROMPT_TEMPLATE", "ZIMAGE_SCHEDULE", "ZImageBase", "ZImageVariant"]

#: what Qwen3's chat template renders for one user message with the generation prompt (thinking
#: on, as the pipelines ask): used where a tokenizer carries no chat template of its own
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: Z-Image's scheduler config: a fixed shift of 3
ZIMAGE_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


class ZImageVariant(Enum):
    Z_IMAGE = "z-image"

    @property
    def label(self) -> str:
        return "Z-Image"


@dataclass
class ZImageBase(DiTBase):
    transformer: ZImageTransformer2DModel
    vae: AutoencoderKL
    text_encoder: nn.Module  # Qwen3: its second-to-last hidden states
    tokenizer: Any
    max_sequence_length: int = 512
    schedule: dict[str, Any] = field(default_factory=lambda: dict(ZIMAGE_SCHEDULE))
    settings: dict[str, Any] = field(default_factory=dict)
    blocks = (ZImageTransformerBlock,)
    linear_sigmas = True
    family = ZImageVariant.Z_IMAGE
    fusion = FUSION

    def modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}

    # ------------------------------------------------------------------ text
    def text_windows(self) -> list[tuple[str, Any, int]]:
        return [("Qwen3", self.tokenizer, self.max_sequence_length)]

    def _templated(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            message = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                message, tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
        return PROMPT_TEMPLATE.format(prompt)

    @torch.no_grad()
    def encode_prompt(
        self, prompts: Sequence[str], *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        """Each prompt's own tokens' second-to-last hidden states (template included, at most
        ``max_sequence_length`` tokens), zero-padded to the longest, and each one's length
        ("text_lengths", on the CPU: the network reads each caption at its own length)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(
            [self._templated(p) for p in prompts],
            max_length=self.max_sequence_length,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        with self.visiting("text_encoder"):
            out = self.text_encoder(
                input_ids=tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True
            )
        rows = [h[m.bool()] for h, m in zip(out.hidden_states[-2], mask)]
        n = max(len(r) for r in rows)
        context = torch.stack([torch.cat([r, r.new_zeros(n - len(r), r.shape[1])]) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        return PromptEmbeddings(context.to(self.dtype), {"text_lengths": lengths})

    def encode_prompts(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        *,
        size: tuple[int, int] | None = None,
        syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """Prompts and negatives in one batch (:func:`~controlnet.families.dit.encode_together`)."""
        return encode_together(self, prompts, negatives, syntax, "Z-Image's text encoder")

    # ------------------------------------------------------------------ denoising
    def control_hint(
        self, controlnet: nn.Module, condition: torch.Tensor, *, inpaint: Inpaint | None = None
    ) -> torch.Tensor:
        """The condition's latents, and after them what else the ControlNet reads. A Union 2.x
        ControlNet (2 x 16 + 1 channels) reads inpainting's: 1 - the mask at the latents' size,
        then the latents of the image to edit with its masked pixels grey, as diffusers'
        ZImageControlNetInpaintPipeline gives them. They come from the request's image and mask
        (``inpaint``), or from an inpainting map given as the condition itself (masked pixels -1:
        ``preprocess: inpaint``), whose control channels are then empty; a plain control leaves
        them empty (zeros), as does any other count of further channels."""
        reads, channels = controlnet.config.control_in_dim, self.vae.config.latent_channels
        marked = (condition < 0).any(dim=1, keepdim=True)
        is_map = bool(marked.any())
        if reads < channels:
            raise ValueError(
                f"this ControlNet reads {reads} condition channels, fewer than the {channels} latent channels"
            )
        if is_map and reads != 2 * channels + 1:
            raise ValueError(
                f"an inpainting map as the condition (masked pixels -1): this ControlNet reads {reads} "
                f"condition channels, no inpainting ones ({2 * channels + 1}: a Union 2.x ControlNet)"
            )
        if is_map:
            hint = None
            image, mask = condition.clamp(0, 1), marked.to(condition)
        else:
            hint = super().control_hint(controlnet, condition)
            if inpaint is None or reads != 2 * channels + 1:
                return torch.cat([hint, hint.new_zeros(hint.shape[0], reads - channels, *hint.shape[2:])], 1)
            image, mask = inpaint.image, (inpaint.mask >= 0.5).to(inpaint.image)
        masked = self._latents((image * 2 - 1) * (1 - mask), shifted=self.hint_shifted(controlnet))
        keep = 1 - F.interpolate(mask, size=masked.shape[-2:], mode="nearest").to(masked)
        hint = torch.zeros_like(masked) if hint is None else hint
        rows = max(hint.shape[0], masked.shape[0])
        return torch.cat([t.expand(rows, *t.shape[1:]) for t in (hint, keep, masked)], dim=1)

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
        """The velocity for latents ``x`` at timestep ``t`` (0-1000): the network reads each row's
        caption at its own length and time running the other way; each control's residuals,
        scaled and summed by layer, go into the main layers (a control for the conditional half
        only gives the unconditional rows none)."""
        b = x.shape[0]
        lengths = (added or {}).get("text_lengths")
        n = lengths.tolist() if lengths is not None else [context.shape[1]] * b
        time = ((1000 - t) / 1000).expand(b)
        s, sizes = prepare(
            self.transformer, list(x.unsqueeze(2).unbind(0)), time, [context[i, : n[i]] for i in range(b)]
        )
        residuals: dict[int, torch.Tensor] = {}
        for c in controls:
            hint = c.hint
            if hint.shape[0] == b - b // 2 and cfg_batch and b > 1:  # one half's: both halves read it
                hint = torch.cat([hint, hint])
            hint = hint.expand(b, *hint.shape[1:]) if hint.shape[0] == 1 else hint
            weight = None if c.region is None else _region_weight(c.region, x.shape[-2:], s.unified)
            # the refiner stage comes before every main layer: it takes the first residual's scale
            tokens = patch_tokens(self.transformer, list(hint.unsqueeze(2).unbind(0)))
            strength = c.scales[0] if weight is None else c.scales[0] * weight[:, : s.x_lens[0]]
            out = c.controlnet(s, tokens, strength)
            for (place, r), scale in zip(out.items(), c.scales):
                r = r * scale if weight is None else r * scale * weight
                if c.conditional_only and cfg_batch:  # the unconditional rows get none
                    r = torch.cat([torch.zeros_like(r[: b // 2]), r[b // 2 :]])
                residuals[place] = residuals[place] + r if place in residuals else r
        out = finish(s, sizes, residuals or None)
        return -torch.stack(out).squeeze(2)

    # ------------------------------------------------------------------ its ControlNets
    def new_controlnet(self, config: Any = None) -> ZImageControlNet:
        config = controlnet_config(ZImageControlNetConfig, config, "Z-Image")
        return ZImageControlNet.from_transformer(self.transformer, config)

    def check_controlnet(self, controlnet: nn.Module, *, controlnet_name: str, base_name: str) -> None:
        if not isinstance(controlnet, ZImageControlNet):
            raise ValueError(f"{controlnet_name} is not a Z-Image ControlNet, and {base_name} is Z-Image")
        ours = shared_fields(self.transformer.config, ZIMAGE_FIELDS)
        theirs = controlnet.transformer_config
        differ = [f"{k} {theirs[k]} vs {ours.get(k)}" for k in theirs if theirs[k] != ours.get(k)]
        if differ:
            raise ValueError(
                f"{controlnet_name} was made for another transformer than {base_name}: {', '.join(differ)}"
            )
        layers, last = len(self.transformer.layers), max(controlnet.config.control_layers_places)
        if last >= layers:
            raise ValueError(
                f"{controlnet_name} places residuals after layer {last}, and {base_name} has {layers} layers"
            )


def _region_weight(region: torch.Tensor, latent: Sequence[int], unified: torch.Tensor) -> torch.Tensor:
    """A control region (1, 1, h, w) as a weight (1, positions, 1) on the joint sequence: each
    image token the region's mean over its 2x2 patch (tokens run row by row), the positions after
    them (padding, the caption) its mean over the image, so that a region of zeros leaves the base
    alone and one of ones acts as no region does."""
    cells = region_tokens(region, (latent[0] // 2, latent[1] // 2), unified.dtype)
    rest = cells.mean().expand(1, unified.shape[1] - cells.shape[1], 1)
    return torch.cat([cells, rest], dim=1)
