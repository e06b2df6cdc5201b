"""A toy model family that is not a UNet: a token transformer over 2x2-packed latents, its
ControlNet a copy of its first blocks on the generic controlled copy. It implements the base-model
protocol and the plug-in functions, so that tests can show a family of another kind running
through generation, the command line and the registry with no change to them.

Its "files" are small JSON documents naming what they hold and a seed: the weights are made
from the seed, deterministically.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from controlnet.choices import PromptSyntax, Sampler
from controlnet.errors import CheckpointError
from controlnet.families.protocol import PromptEmbeddings
from controlnet.model.control import residual_functions, sum_residuals
from controlnet.model.zero import ControlledCopy, zero_linear

NAME = "toy"
LABEL = "Toy token transformer"
WIDTH, DEPTH, CHANNELS, PATCH = 32, 3, 4, 2


class ToyVariant(str):
    """The family's one variant, with the ``.value`` and ``.label`` the protocol asks for."""

    value = "toy"
    label = "Toy"


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens of 2x2 patches."""
    return F.pixel_unshuffle(x, PATCH).flatten(2).transpose(1, 2)


def _unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    return F.pixel_shuffle(tokens.transpose(1, 2).reshape(b, d, h // PATCH, w // PATCH), PATCH)


class ToyTransformer(nn.Module):
    """Patch embedding, DEPTH transformer blocks reading the text by attention, a patch output."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(CHANNELS * PATCH * PATCH, WIDTH)
        self.t_embedder = nn.Linear(1, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True)
            for _ in range(DEPTH)
        )
        self.proj_out = nn.Linear(WIDTH, CHANNELS * PATCH * PATCH)

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).to(x).expand(x.shape[0])[:, None, None] / 1000
        return self.x_embedder(_pack(x)) + self.t_embedder(t)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, residuals=None
    ) -> torch.Tensor:
        h = self.embed(x, t)
        for i, block in enumerate(self.blocks):
            h = block(h, context)
            if residuals is not None and i < len(residuals):
                h = h + residuals[i]
        return _unpack(self.proj_out(h), *x.shape[-2:])


class ToyControlNet(ControlledCopy):
    """Copies of the first ``n`` blocks; the condition image enters as packed tokens of its 8x
    downsampling through a zero-initialised embedder; one zero Linear per copied block."""

    def __init__(self, base: ToyTransformer, n: int = 2) -> None:
        super().__init__()
        self.x_embedder = copy.deepcopy(base.x_embedder)
        self.t_embedder = copy.deepcopy(base.t_embedder)
        self.blocks = copy.deepcopy(base.blocks[:n])
        self.cond_embedder = zero_linear(3 * PATCH * PATCH, WIDTH)
        self.zero_outs = nn.ModuleList(zero_linear(WIDTH, WIDTH) for _ in range(n))
        self.config = SimpleNamespace(global_pool=False)
        self.requires_grad_(True)

    @property
    def num_residuals(self) -> int:
        return len(self.zero_outs)

    def condition_layer(self) -> nn.Module:
        return self.cond_embedder

    def output_layers(self) -> list[nn.Module]:
        return list(self.zero_outs)

    def copy_forward(self, h: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            h = block(h, context)
            outs.append(h)
        return outs

    def encode_hint(self, cond: torch.Tensor) -> torch.Tensor:
        grid = F.avg_pool2d(cond.float(), 8).to(self.cond_embedder.weight)
        return self.embed_condition(F.pixel_unshuffle(grid, PATCH).flatten(2).transpose(1, 2))

    def forward(self, sample, timestep, context, hint, added=None) -> list[torch.Tensor]:
        t = timestep.reshape(-1).to(sample).expand(sample.shape[0])[:, None, None] / 1000
        x = self.x_embedder(_pack(sample)) + self.t_embedder(t)
        return self.residuals(x, hint, context)


@dataclass
class ToyPosterior:
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class ToyBase:
    """The toy family's base model: the protocol, on the toy transformer."""

    network: ToyTransformer
    text: nn.Embedding
    family: Any = field(default_factory=ToyVariant)
    vae: Any = None

    def __post_init__(self) -> None:
        self.network.requires_grad_(False).eval()
        self.text.requires_grad_(False)

    # placement
    @property
    def device(self) -> torch.device:
        return self.network.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.proj_out.weight.dtype

    def to(self, device=None, dtype=None, *, offload=False, companions=()) -> ToyBase:
        for m in [*self.modules().values(), *companions]:
            m.to(device=device, dtype=dtype)
        return self

    def modules(self) -> dict[str, nn.Module]:
        return {"network": self.network, "text": self.text}

    # geometry
    native_size = 64
    latent_channels = CHANNELS
    latent_scale = 1.0

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // 8, size[1] // 8

    # text
    def encode_prompt(self, prompts, *, size=None) -> PromptEmbeddings:
        ids = torch.tensor([[ord(ch) % 256 for ch in (p + " " * 8)[:8]] for p in prompts], device=self.device)
        return PromptEmbeddings(self.text(ids).to(self.dtype))

    def encode_prompts(self, prompts, negatives, *, size=None, syntax=PromptSyntax.WEIGHTED):
        neg = None if negatives is None else self.encode_prompt(list(negatives))
        return self.encode_prompt(list(prompts)), neg

    def text_windows(self):
        class Characters:  # the toy reads characters, the first 8
            def __call__(self, texts, **_):
                ids = [[ord(ch) for ch in t] for t in ([texts] if isinstance(texts, str) else texts)]
                return type("Tokens", (), {"input_ids": ids})()

        return [("the toy text encoder", Characters(), 8)]

    def use_fp8(self, controlnets, *, device=None, dtype=None) -> None:
        raise ValueError("fp8: the toy family has no FP8 path")

    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip != 1:
            raise ValueError(f"the toy family reads one text layer, got clip_skip {clip_skip}")

    def with_clip_skip(self, clip_skip: int) -> ToyBase:
        return self

    # images: latents are the image averaged over 8x8 cells (a fixed, linear "VAE")
    def posterior(self, images, *, tiled=False, per_image=True) -> ToyPosterior:
        mean = F.avg_pool2d(images.float(), 8)
        mean = torch.cat([mean, mean.mean(1, keepdim=True)], 1)
        return ToyPosterior(mean, torch.zeros_like(mean))

    def scaled_sample(self, mean, std, noise):
        return (mean + std * noise) * self.latent_scale

    def encode_images(self, images, generator=None, *, tiled=False):
        dist = self.posterior(images)
        return dist.mean.expand(len(generator) if isinstance(generator, list) else len(images), -1, -1, -1)

    def decode_latents(self, latents, *, tiled=False):
        return F.interpolate(latents[:, :3].float(), scale_factor=8, mode="nearest").clamp(-1, 1)

    def with_vae(self, vae) -> ToyBase:
        return replace(self, vae=vae)

    # denoising
    @property
    def denoiser(self) -> nn.Module:
        return self.network

    guidance_input = False

    def control_hint(self, controlnet, condition, *, inpaint=None):  # its ControlNets read no edit
        return controlnet.encode_hint(condition)

    def scheduler(self, sampler, spacing, *, latent_size=None):
        if Sampler.parse(sampler) is not Sampler.DDIM:
            raise ValueError(f"the toy family samples with ddim only, got {Sampler.parse(sampler).value}")
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    def predict(self, x, t, context, controls=(), *, added=None, cfg_batch=False, concurrent=False):
        fns = residual_functions(list(controls), x, t, context, cfg_batch, added)
        residuals = sum_residuals([fn() for fn in fns]) if fns else None
        return self.network(x, t, context, residuals)

    def compile(self, *, vae=False) -> None:
        pass

    # ControlNets and training
    def new_controlnet(self, config=None) -> ToyControlNet:
        return ToyControlNet(self.network)

    def check_controlnet(self, controlnet, *, controlnet_name, base_name) -> None:
        if not isinstance(controlnet, ToyControlNet):
            raise ValueError(f"{controlnet_name} is not a toy ControlNet; it does not fit {base_name}")

    def controlled(self, controlnet, *, only_mid_control=False) -> nn.Module:
        raise NotImplementedError

    def decoder_parameters(self):
        return []

    def noise_scheduler(self):
        return DDPMScheduler()


def make_base(seed: int = 0) -> ToyBase:
    torch.manual_seed(seed)
    return ToyBase(ToyTransformer(), nn.Embedding(256, WIDTH))


def trained_controlnet(base: ToyBase, seed: int = 1) -> ToyControlNet:
    """A toy ControlNet with its zero layers opened, as after training."""
    cn = ToyControlNet(base.network)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for z in [cn.cond_embedder, *cn.zero_outs]:
            for p in z.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cn


# ---------------------------------------------------------------------------- the plug-in functions
BASE = ToyBase


def _read(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a toy model file") from None
    if not isinstance(data, dict) or data.get("toy") not in ("base", "controlnet"):
        raise CheckpointError(f"{path}: not a toy model file")
    return data


def detect(path) -> str:
    return f"toy {_read(path)['toy']}"


def load_base(path, *, dtype=None) -> ToyBase:
    data = _read(path)
    if data["toy"] != "base":
        raise CheckpointError(f"{path}: holds no base model (it is a toy controlnet)")
    return make_base(data["seed"]).to(dtype=dtype)


def load_controlnet(path, *, dtype=None, base_network=None) -> ToyControlNet:
    data = _read(path)
    if data["toy"] != "controlnet":
        raise CheckpointError(f"{path}: holds no ControlNet (it is a toy base)")
    return trained_controlnet(make_base(data["base_seed"]), data["seed"]).to(dtype=dtype)


def needs_base(path) -> bool:
    return False


def load_vae(path, *, base):
    raise CheckpointError(f"{path}: the toy family has no separate VAE files")


def merge_loras(base, loras) -> None:
    raise CheckpointError("the toy family reads no LoRA files")


def write(path: Path, kind: str, seed: int, base_seed: int = 0) -> Path:
    path.write_text(json.dumps({"toy": kind, "seed": seed, "base_seed": base_seed}))
    return path
