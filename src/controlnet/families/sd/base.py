"""The locked base model: UNet, VAE, text encoder(s), tokenizer(s) and noise schedule, as one bundle.

Everything that differs between families at run time lives here: how prompts become the UNet's
context (SD1.x: last hidden state; SD2.x: the penultimate OpenCLIP layer, which the 23-layer
text model's last hidden state already is; SDXL: the penultimate layers of both encoders,
concatenated, plus the second encoder's pooled projection and the size/crop ids), and how images
become latents, and the UNet families' side of the family protocol (schedulers, the UNet's
prediction with ControlNet residuals, the ControlNet that fits it). Loading from files is
:mod:`controlnet.formats`; the sampler and the trainer take any
:class:`~controlnet.families.protocol.BaseModel` and never ask which family or size it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ...choices import PromptSyntax, Sampler, TimestepSpacing
from ...model.residence import Residence, move, pin
from ...text.tokenizer import MAX_LENGTH
from ..protocol import Inpaint, PromptEmbeddings, check_hint_scale
from .configs import Family

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from ...model.control import Control

__all__ = ["DEFAULT_SCHEDULE", "OFFLOADED", "UNetBase"]

#: The noise schedule every SD family was trained with (diffusers scheduler keyword arguments).
DEFAULT_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

#: The parts that run once per generation, before the steps (the text encoders) or around them
#: (the VAE): what offloading keeps in CPU memory while the UNet and ControlNets run.
OFFLOADED = ("vae", "text_encoder", "text_encoder_2")


@dataclass
class UNetBase(Residence):
    """A Stable Diffusion-family model, locked (no gradients, eval mode): the UNet families'
    :class:`~controlnet.families.protocol.BaseModel`."""

    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    schedule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    #: read the text encoder's ``clip_skip``-th layer from the end (1: the last), then its final
    #: layer norm: the A1111 web UI's "Clip skip" (diffusers' ``clip_skip`` is this minus 1). SD1.x
    #: only: SD2.x and SDXL read a fixed penultimate layer, and the web UI ignores it for them too.
    clip_skip: int = 1
    #: generation settings that belong to this model (guidance, prompts, ...), kept in our format's
    #: metadata so they apply wherever it is loaded (:mod:`controlnet.formats.ours`)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._token_memo: dict[int, dict[str, torch.Tensor]] = {}
        if self.family is Family.SDXL and (self.text_encoder_2 is None or self.tokenizer_2 is None):
            raise ValueError("an SDXL base model needs text_encoder_2 and tokenizer_2")
        self.check_clip_skip(self.clip_skip)
        for m in self.modules().values():
            m.requires_grad_(False).eval()

    # ------------------------------------------------------------------ basics
    def modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
        }
        if self.text_encoder_2 is not None:
            mods["text_encoder_2"] = self.text_encoder_2
        return mods

    def resident_device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side (8 for every SD family)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side in pixels the UNet was made for: the ``resolution`` its file's generation
        settings give, else its latent sample size, in pixels."""
        return int(self.settings.get("resolution") or self.unet.config.sample_size * self.vae_scale_factor)

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the latents of images of ``size`` (H, W)."""
        return size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    # ------------------------------------------------------------------ denoising (the protocol)
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def guidance_input(self) -> bool:
        """The UNets take guidance as classifier-free guidance, never as an input."""
        return False

    def control_hint(
        self, controlnet: torch.nn.Module, condition: torch.Tensor, *, inpaint: Inpaint | None = None
    ) -> torch.Tensor:
        """The ControlNet's hint encoder reads the condition image itself."""
        return controlnet.encode_hint(condition)

    def scheduler(
        self,
        sampler: Sampler | str,
        spacing: TimestepSpacing | str = TimestepSpacing.DEFAULT,
        *,
        latent_size: tuple[int, int] | None = None,
    ) -> SchedulerMixin:
        """A fresh diffusers scheduler over the model's training schedule (:mod:`.schedulers`);
        the same at every size."""
        from .schedulers import make_scheduler

        return make_scheduler(sampler, self.schedule, spacing)

    def noise_scheduler(self) -> Any:
        """The training-time noising of the model's schedule (epsilon or v prediction)."""
        from .schedulers import DDPMTraining

        return DDPMTraining(self.schedule)

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
        """The UNet's prediction with the controls' residuals on its skips and middle block
        (:func:`.forward.controlled_unet_forward`)."""
        from .forward import controlled_unet_forward

        return controlled_unet_forward(
            self.unet,
            x,
            t,
            context,
            controls,
            cfg_batch=cfg_batch,
            added_cond_kwargs=added,
            concurrent=concurrent,
        )

    def compile(self, *, vae: bool = False) -> None:
        """Compile the UNet, and its halves that run beside ControlNets on side streams
        (``vae``: the VAE's decoder too, a forward of its own)."""
        from ...model.fastpath import compile_modules
        from .halves import compile_halves

        compile_modules([self.unet])
        compile_halves(self.unet, "default")
        if vae:
            compile_modules([self.vae.decoder])

    # ------------------------------------------------------------------ its ControlNets (the protocol)
    def new_controlnet(self, config: Any = None) -> torch.nn.Module:
        """A fresh ControlNet: an exact copy of the UNet's encoder, a new hint encoder (scaling the
        condition down as this VAE does unless ``config`` says otherwise), zero convs."""
        from ..protocol import controlnet_config
        from .controlnet import ControlNet, ControlNetConfig

        own = {"hint_block_channels": ControlNetConfig.hint_widths(self.vae_scale_factor)}
        return ControlNet.from_unet(self.unet, controlnet_config(ControlNetConfig, config, "UNet", own))

    def check_controlnet(self, controlnet: torch.nn.Module, *, controlnet_name: str, base_name: str) -> None:
        """ValueError naming both unless ``controlnet`` was made for this UNet's architecture."""
        from .adapter import T2IAdapter
        from .compat import check_compatible

        if isinstance(controlnet, T2IAdapter):
            controlnet.check_unet(
                dict(self.unet.config),
                name=controlnet_name,
                base_name=base_name,
                latent_factor=self.vae_scale_factor,
            )
            return
        check_compatible(controlnet, self, controlnet_name=controlnet_name, base_name=base_name)
        check_hint_scale(
            controlnet.config.hint_downscale,
            self.vae_scale_factor,
            subject=f"{controlnet_name}'s hint encoder",
            base_name=base_name,
        )

    def controlled(
        self, controlnet: torch.nn.Module, *, only_mid_control: bool = False, control_type: int | None = None
    ) -> torch.nn.Module:
        """The locked UNet with one trainable ControlNet: the module a training loss is taken on."""
        from .forward import ControlledUNet

        if control_type is not None:
            raise ValueError("--control-mode: training a Union ControlNet for a UNet base is not supported")
        return ControlledUNet(self.unet, controlnet, only_mid_control=only_mid_control)

    def decoder_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The UNet decoder's parameters: what ``sd_locked=False`` trains beside the ControlNet."""
        from .forward import decoder_parameters

        return decoder_parameters(self.unet)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        offload: bool = False,
        companions: Sequence[torch.nn.Module] = (),
    ) -> UNetBase:
        """Move every part (the VAE stays float32 when ``dtype`` is float16: SD's VAE overflows in
        fp16), and ``companions`` (the ControlNets) beside the UNet. ``offload``: the text encoders
        and the VAE (:data:`OFFLOADED`) live in pinned CPU memory instead and visit the UNet's
        device only while they run (:class:`~controlnet.model.residence.Residence`)."""
        for name, m in self.modules().items():
            d = torch.float32 if (name == "vae" and dtype == torch.float16) else dtype
            where = "cpu" if offload and name in OFFLOADED else device
            current = next(m.parameters())
            if d is not None and d == current.dtype:
                d = None
            if d is not None or (where is not None and torch.device(where) != current.device):
                move(m, where, d)
            if offload and name in OFFLOADED:
                pin(m)
        self.keep_company(companions, device, dtype)
        return self

    def text_windows(self) -> list[tuple[str, Any, int]]:
        return [("CLIP", self.tokenizer, MAX_LENGTH - 2)]  # SDXL's two CLIPs read the same window

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str], *, second: bool = False) -> torch.Tensor:
        """Token ids (B, 77) of the (first, or SDXL's second) text encoder, on the model's device.
        Each distinct prompt is tokenized once (training repeats prompts every epoch)."""
        tokenizer = self.tokenizer_2 if second else self.tokenizer
        assert tokenizer is not None
        memo = self._token_memo.setdefault(int(second), {})
        new = [p for p in dict.fromkeys(prompts) if p not in memo]
        if new:
            if len(memo) > 200_000:  # bounded: a run with endless distinct prompts starts over
                memo.clear()
            for p, ids in zip(new, self._tokens(tokenizer, new)):  # kept where they are made
                memo[p] = ids
        return torch.stack([memo[p] for p in prompts]).to(self.device)

    def _tokens(self, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def encode_prompts(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        *,
        size: tuple[int, int] | None = None,
        syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """Each sample's prompt and negative prompt read by the CLIP encoders under the prompt
        syntax (:func:`controlnet.text.prompts.encode_guided`)."""
        from ...text.prompts import encode_guided

        return encode_guided(self, prompts, negatives, size=size, syntax=syntax)

    @torch.no_grad()
    def encode_prompt(
        self, prompts: Sequence[str], *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        """Prompts -> UNet context, each cut to the encoder's 77-token window (prompt syntax and
        longer prompts: :mod:`controlnet.text.prompts`). ``size`` (height, width) of the image feeds
        SDXL's time ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids_2 = self._tokens(self.tokenizer_2, prompts) if self.tokenizer_2 is not None else None
        return self.encode_tokens(self._tokens(self.tokenizer, prompts), ids_2, size=size)

    @torch.no_grad()
    def encode_tokens(
        self, ids: torch.Tensor, ids_2: torch.Tensor | None = None, *, size: tuple[int, int] | None = None
    ) -> PromptEmbeddings:
        """Token ids (B, 77) of the text encoder (and ``ids_2`` of SDXL's second) -> UNet context."""
        with self.visiting("text_encoder", "text_encoder_2"):
            return self._encode_tokens(ids, ids_2, size)

    def _encode_tokens(
        self, ids: torch.Tensor, ids_2: torch.Tensor | None, size: tuple[int, int] | None
    ) -> PromptEmbeddings:
        ids = ids.to(self.device)
        if self.family is not Family.SDXL:
            if self.clip_skip == 1:
                return PromptEmbeddings(self.text_encoder(ids).last_hidden_state.to(self.dtype))
            hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
            # transformers 4 nests the layers under .text_model; 5 holds them directly
            norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            return PromptEmbeddings(norm(hidden).to(self.dtype))
        assert self.text_encoder_2 is not None
        if ids_2 is None:
            raise ValueError("an SDXL model needs the token ids of its second text encoder too")
        out1 = self.text_encoder(ids, output_hidden_states=True)
        out2 = self.text_encoder_2(ids_2.to(self.device), output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        h, w = size or (self.native_size,) * 2
        # original size, crop top-left, target size (SDXL micro-conditioning)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).repeat(
            len(ids), 1
        )
        return PromptEmbeddings(
            context.to(self.dtype), {"text_embeds": out2.text_embeds.to(self.dtype), "time_ids": time_ids}
        )

    # ------------------------------------------------------------------ images
    def posterior(
        self, images: torch.Tensor, *, tiled: bool = False, per_image: bool = True
    ) -> DiagonalGaussianDistribution:
        """The VAE's posterior over the (unscaled) latents of images (B, 3, H, W) in [-1, 1]: the
        one place images are encoded (generation, training, caches, validation). ``per_image``:
        one image at a time (the VAE's memory is one image's); False: the batch at once (training
        steps). ``tiled``: images larger than the VAE's tile (its config's sample size) are
        encoded in overlapping tiles (:meth:`_vae_moments`). Gradients flow when enabled."""
        images = images.to(self.vae.dtype)
        if not per_image and not tiled:
            return self.visit("vae", lambda: self.vae.encode(images).latent_dist)
        return self.visit("vae", lambda: DiagonalGaussianDistribution(self._vae_moments(images, tiled)))

    def scaled_sample(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents the UNet reads: a posterior sample ``mean + std * noise``, scaled."""
        return (mean + std * noise) * self.latent_scale

    @torch.no_grad()
    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        tiled: bool = False,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8), sampled from the
        posterior (``generator`` makes it reproducible). A list of generators gives one sample per
        generator, sample i drawn by generator i exactly as alone; one image (B = 1) is then
        encoded once and shared by all. ``tiled``: as :meth:`posterior`."""
        dist = self.posterior(images, tiled=tiled)
        if not isinstance(generator, list):
            noise = randn_tensor(
                dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype
            )
            return self.scaled_sample(dist.mean, dist.std, noise).to(self.dtype)
        if len(images) not in (1, len(generator)):
            raise ValueError(
                f"{len(generator)} generators for {len(images)} images: expected one image or one each"
            )
        shape = (len(generator), *dist.mean.shape[1:])
        noise = randn_tensor(shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype)
        return self.scaled_sample(dist.mean, dist.std, noise).to(self.dtype)

    def _vae_moments(self, images: torch.Tensor, tiled: bool) -> torch.Tensor:
        """The VAE encoder's posterior moments of ``images`` (:func:`_one_at_a_time`)."""
        vae = self.vae

        def whole(x: torch.Tensor) -> torch.Tensor:
            return vae.encode(x).latent_dist.parameters

        return _one_at_a_time(images, vae.tile_sample_min_size, whole, vae._tiled_encode if tiled else None)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1] (clamped), one image at a time (the
        VAE's memory does not grow with the batch). ``tiled``: latents larger than the VAE's tile
        (its config's sample size, in latent cells) are decoded in overlapping tiles, blended where
        they overlap (diffusers' tiling: memory bounded by the tile, at the risk of seams)."""
        vae = self.vae
        images = self.visit(
            "vae",
            lambda: _one_at_a_time(
                latents.to(vae.dtype) / self.latent_scale,
                vae.tile_latent_min_size,
                lambda z: vae.decode(z).sample,
                (lambda z: vae.tiled_decode(z).sample) if tiled else None,
            ),
        )
        return images.clamp(-1, 1).float()

    def with_schedule(self, **overrides: Any) -> UNetBase:
        return replace(self, schedule={**self.schedule, **overrides})

    def use_fp8(
        self, controlnets: Sequence[torch.nn.Module], *, device: Any = None, dtype: torch.dtype | None = None
    ) -> None:
        raise ValueError("fp8: FP8 weights are for the transformer families (Flux.1, SD3); use bf16 or fp16")

    def check_clip_skip(self, clip_skip: int) -> None:
        """ValueError unless this model can read its text encoder ``clip_skip`` layers from the end."""
        if clip_skip != 1 and self.family is not Family.SD1:
            raise ValueError(
                f"clip_skip applies to SD1.x text encoders; this {self.family.value} model reads a fixed "
                f"penultimate layer (got clip_skip {clip_skip}; use 1)"
            )
        layers = self.text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(
                f"clip_skip must be between 1 and the text encoder's {layers} layers, got {clip_skip}"
            )

    def with_vae(self, vae: AutoencoderKL) -> UNetBase:
        """The same model decoding and encoding with another VAE (a fine-tuned one, say)."""
        return replace(self, vae=vae)

    def with_clip_skip(self, clip_skip: int) -> UNetBase:
        """The same modules, reading prompts from another text encoder layer."""
        return self if clip_skip == self.clip_skip else replace(self, clip_skip=clip_skip)


def _one_at_a_time(
    x: torch.Tensor,
    tile: int,
    whole: Callable[[torch.Tensor], torch.Tensor],
    in_tiles: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """``whole`` of each image of the batch ``x`` in turn, concatenated: the VAE's memory is one
    image's, not the batch's. With ``in_tiles``, an image larger than ``tile`` along a side goes
    to it instead (diffusers' tiling: overlapping tiles of that size, blended where they overlap)."""
    out = []
    for xi in x.split(1):
        out.append(in_tiles(xi) if in_tiles is not None and max(xi.shape[-2:]) > tile else whole(xi))
    return torch.cat(out)
