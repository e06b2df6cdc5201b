"""A Qwen-Image base model behind the base-model protocol (issue 34).

Locked parts: diffusers' ``QwenImageTransformer2DModel`` (an MMDiT of 60 double-stream blocks
with 3-axis rotary positions) and ``AutoencoderKLQwenImage`` (16 latent channels, a frame axis of
one frame for images, each channel normalised by its own mean and deviation), and the Qwen2.5-VL
language model through transformers as the text encoder: the prompt goes into the published
system template, the encoder's last hidden states are read and the template's leading tokens
dropped; a text mask marks each prompt's own tokens.

Latents are (B, 16, h, w) outside, as every family's; :meth:`QwenImageBase.predict` packs them in
2x2 patches, runs the ControlNets on the conditional prompt and adds their residuals to both
halves of a guided batch (as the published pipelines do), and unpacks the velocity. Guidance is
"true" classifier-free guidance whose result is rescaled, token by token, to the conditional
prediction's norm (:meth:`QwenImageBase.combine_guidance`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from torch import nn

from ...choices import PromptSyntax
from ...model import fused
from ...model.control import Control, region_tokens
from ...model.fastpath import run_concurrently
from ..dit import DiTBase, encode_together, pack, shared_fields, spread_residuals, unpack
from ..protocol import PromptEmbeddings, controlnet_config
from .controlnet import QWEN_FIELDS, QwenImageControlNet, QwenImageControlNetConfig
from .frames import frames_as_images
from .fused import FUSION, sharing_step

__all__ = ["PROMPT_TEMPLATE", "QWEN_SCHEDULE", "QwenImageBase", "QwenImageVariant"]

#: the system prompt Qwen-Image's text encoder reads each prompt in (the published pipeline's)
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
#: the template's tokens before the prompt under Qwen2.5-VL's tokenizer: dropped from the output
TEMPLATE_TOKENS = 34
#: Qwen-Image's scheduler config: a shift growing with the token count, exponential time shift,
#: stretched to end at 0.02
QWEN_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


class QwenImageVariant(Enum):
    QWEN_IMAGE = "qwen-image"

    @property
    def label(self) -> str:
        return "Qwen-Image"


class _Frame:
    """The VAE's posterior over one frame, without the frame axis: ``mean`` and ``std`` (B, C, h, w)."""

    def __init__(self, dist: Any) -> None:
        self.mean, self.std = dist.mean[:, :, 0], dist.std[:, :, 0]


@dataclass
class QwenImageBase(DiTBase):
    transformer: QwenImageTransformer2DModel
    vae: AutoencoderKLQwenImage
    text_encoder: nn.Module  # Qwen2.5-VL: its last hidden states
    tokenizer: Any
    max_sequence_length: int = 512
    schedule: dict[str, Any] = field(default_factory=lambda: dict(QWEN_SCHEDULE))
    settings: dict[str, Any] = field(default_factory=dict)
    blocks = (QwenImageTransformerBlock,)
    family = QwenImageVariant.QWEN_IMAGE
    fusion = FUSION
    family_size = 1328

    def modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}

    # ------------------------------------------------------------------ geometry and latents
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def latent_scale(self) -> float:
        return 1.0  # each channel has its own (latent_stats)

    @property
    def latent_shift(self) -> float:
        return 0.0

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each channel's mean and deviation (1, C, 1, 1), on ``like``'s device and dtype."""
        c = self.vae.config
        view = (1, c.z_dim, 1, 1)
        mean = torch.tensor(c.latents_mean).view(view).to(like.device, like.dtype)
        return mean, torch.tensor(c.latents_std).view(view).to(like.device, like.dtype)

    def posterior(self, images: torch.Tensor, *, tiled: bool = False, per_image: bool = True) -> Any:
        # one frame, its convolutions in 2-D (frames.py)
        def encode() -> Any:
            with frames_as_images(self.vae):
                return _Frame(self.vae.encode(images.to(self.device, self.vae.dtype)[:, :, None]).latent_dist)

        return self.visit("vae", encode)

    def scaled_sample(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.latent_stats(mean)
        return (mean + std * noise - mu) / sigma

    def _latents(self, images: torch.Tensor, *, shifted: bool) -> torch.Tensor:
        mean = self.posterior(images).mean
        mu, sigma = self.latent_stats(mean)
        return ((mean - mu) / sigma).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W)."""

        def decode() -> torch.Tensor:
            z = latents.to(device=self.device, dtype=self.vae.dtype)
            mu, sigma = self.latent_stats(z)
            with frames_as_images(self.vae):  # its convolutions in 2-D (frames.py)
                return self.vae.decode((z * sigma + mu)[:, :, None]).sample[:, :, 0].clamp(-1, 1).float()

        return self.visit("vae", decode)

    # ------------------------------------------------------------------ text
    def text_windows(self) -> list[tuple[str, Any, int]]:
        return [("Qwen2.5-VL", self.tokenizer, self.max_sequence_length)]

    @torch.no_grad()
    def encode_prompt(
        self, prompts: Sequence[str], *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        """The text encoder's last hidden states of each prompt's own tokens (the template's
        dropped, at most ``max_sequence_length``), zero-padded to the longest, and each one's
        length ("text_lengths", on the CPU: host data, so that a step reads each prompt at its
        own length without a mask to read on the GPU, which a CUDA graph could not capture)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE.format(p) for p in prompts],
            max_length=self.max_sequence_length + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        with self.visiting("text_encoder"):
            out = self.text_encoder(
                input_ids=tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True
            )
        hidden = out.hidden_states[-1]
        rows = [h[m.bool()][TEMPLATE_TOKENS:][: self.max_sequence_length] for h, m in zip(hidden, mask)]
        n = max(len(r) for r in rows)
        context = torch.stack([torch.cat([r, r.new_zeros(n - len(r), r.shape[1])]) for r in rows])
        return PromptEmbeddings(
            context.to(self.dtype), {"text_lengths": torch.tensor([len(r) for r in rows])}
        )

    def encode_prompts(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        *,
        size: tuple[int, int] | None = None,
        syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """Prompts and negatives in one batch (:func:`~controlnet.families.dit.encode_together`)."""
        return encode_together(self, prompts, negatives, syntax, "Qwen-Image's text encoder")

    # ------------------------------------------------------------------ denoising
    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """True classifier-free guidance, each 2x2 token of the result rescaled to the norm of the
        conditional prediction's (the published pipeline's)."""
        guided = uncond + scale * (cond - uncond)
        h, w = cond.shape[-2:]
        c, g = pack(cond), pack(guided)
        return unpack(g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True)), h, w)

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
        """The velocity for latents ``x`` at timestep ``t`` (0-1000). Each control's ControlNet
        reads the conditional prompt (the conditional half of a guided batch) and its residuals,
        scaled, go to every row. Rows run in runs of one caption length, each caption read at its
        own length with no mask (as the pipeline runs each half alone)."""
        b, _, h, w = x.shape
        tokens = pack(x)
        timestep = (t / 1000).to(x.dtype).expand(b)
        lengths = (added or {}).get("text_lengths")
        n = lengths.tolist() if lengths is not None else [context.shape[1]] * b
        half = b // 2 if cfg_batch else 0  # where the conditional rows start
        shapes = [(1, h // 2, w // 2)]

        def residuals(c: Control) -> list[torch.Tensor]:
            hint = c.hint[half:] if c.hint.shape[0] == b and half else c.hint
            hint = hint.expand(b - half, *hint.shape[1:]) if hint.shape[0] == 1 else hint
            runs = []
            for s, e, length in _runs(n, half, b):
                out = c.controlnet(
                    tokens[s:e],
                    pack(hint[s - half : e - half]),
                    encoder_hidden_states=context[s:e, :length],
                    timestep=timestep[s:e],
                    img_shapes=shapes * (e - s),
                )
                runs.append(out)
            res = [torch.cat(parts) * scale for parts, scale in zip(zip(*runs), c.scales)]
            if c.region is not None:
                weight = region_tokens(c.region, (h // 2, w // 2), res[0].dtype)
                res = [r * weight for r in res]
            return res

        fns = [partial(residuals, c) for c in controls]
        each = run_concurrently(fns, x.device) if concurrent else [fn() for fn in fns]
        blocks = self.transformer.transformer_blocks
        summed = _summed(each, len(blocks))
        in_blocks = summed is not None and fused.takes_residuals(blocks)  # in the blocks' last sums
        if in_blocks:
            summed = spread_residuals(summed, len(blocks))
        outs = []
        with sharing_step(self.transformer):  # every row reads timestep t
            for s, e, length in _runs(n, 0, half) + _runs(n, half, b):
                r0 = s - half if s >= half else s  # a conditional row's residuals: also its twin's
                samples = None if summed is None else [r[r0 : r0 + e - s] for r in summed]
                adding = contextlib.nullcontext()
                if in_blocks:
                    adding, samples = fused.adding_residuals(blocks, samples), None
                with adding:
                    outs.append(
                        self.transformer(
                            hidden_states=tokens[s:e],
                            encoder_hidden_states=context[s:e, :length],
                            timestep=timestep[s:e],
                            img_shapes=shapes * (e - s),
                            controlnet_block_samples=samples,
                        ).sample
                    )
        return unpack(torch.cat(outs), h, w)

    # ------------------------------------------------------------------ its ControlNets
    def new_controlnet(self, config: Any = None) -> QwenImageControlNet:
        config = controlnet_config(QwenImageControlNetConfig, config, "Qwen-Image")
        return QwenImageControlNet.from_transformer(self.transformer, config)

    def check_controlnet(self, controlnet: nn.Module, *, controlnet_name: str, base_name: str) -> None:
        if not isinstance(controlnet, QwenImageControlNet):
            raise ValueError(
                f"{controlnet_name} is not a Qwen-Image ControlNet, and {base_name} is Qwen-Image"
            )
        ours = shared_fields(self.transformer.config, QWEN_FIELDS)
        theirs = controlnet.transformer_config
        differ = [f"{k} {theirs[k]} vs {ours.get(k)}" for k in theirs if theirs[k] != ours.get(k)]
        if differ:
            raise ValueError(
                f"{controlnet_name} was made for another transformer than {base_name}: {', '.join(differ)}"
            )


def _runs(lengths: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(first row, end row, caption length) of each run of rows in [start, stop) whose captions
    have one length."""
    out = []
    i = start
    while i < stop:
        j = i
        while j < stop and lengths[j] == lengths[i]:
            j += 1
        out.append((i, j, lengths[i]))
        i = j
    return out


def _summed(each: list[list[torch.Tensor]], blocks: int) -> list[torch.Tensor] | None:
    """Several ControlNets' residuals, each spread over the base's blocks as the base reads one
    ControlNet's (block j takes residual ``j // ceil(blocks / n)``), summed block by block; the
    base then reads residual j at block j."""
    if len(each) <= 1:
        return each[0] if each else None
    spreads = [spread_residuals(r, blocks) for r in each]
    return [torch.stack([s[j] for s in spreads]).sum(0) for j in range(blocks)]
