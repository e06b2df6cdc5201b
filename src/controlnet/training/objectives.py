"""What a training run trains and the loss it takes (paper section 3.3).

The training loop (:mod:`controlnet.training.train`) is the same for every objective: it feeds batches,
steps the optimizer and keeps checkpoints. An objective is a module whose ``forward(batch, noise)``
returns the loss, and which says which of its modules are trained and saved.

Randomness is stateless: every draw of a micro-batch comes from a generator seeded by
(seed, step, micro-step) over the GLOBAL batch, of which each process keeps its own rows. A
resumed run therefore continues bit-identically, and N processes with batch B see exactly the
noise one process with batch N*B would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..families.protocol import BaseModel, PromptEmbeddings
from ..families.sd.controlnet import ControlNet
from .sharding import assign

__all__ = [
    "BaseObjective",
    "ControlNetObjective",
    "DiffusionInputs",
    "Objective",
    "StepNoise",
    "VaeObjective",
    "as_condition",
]


class StepNoise:
    """Random draws for one micro-batch, identical on every process.

    Each draw is made for all ``global_batch`` rows from one generator and sliced to ``rows``.
    Draws must be made in the same order everywhere (they are: the code path is the same). Tensor
    draws come from a generator on the training device (a host draw copied from pageable memory
    would stall the host until the GPU had caught up, every step); draws the host itself needs
    (which prompts to drop) come from a second, host generator, so that reading them never waits
    for the GPU either.
    """

    def __init__(
        self, seed: int, step: int, micro: int, global_batch: int, rows: slice, device: torch.device | str
    ) -> None:
        state = np.random.SeedSequence([seed, step + 1, micro]).generate_state(2, dtype=np.uint64)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(int(state[0] >> np.uint64(1)))
        self.host_generator = torch.Generator().manual_seed(int(state[1] >> np.uint64(1)))
        self.global_batch = global_batch
        self.rows = rows

    def randn(self, *shape: int) -> torch.Tensor:
        x = torch.randn((self.global_batch, *shape), generator=self.generator, device=self.device)
        return x[self.rows]

    def host_rand(self) -> torch.Tensor:
        """Uniform draws on the host, for decisions Python takes (no wait for the device)."""
        return torch.rand(self.global_batch, generator=self.host_generator)[self.rows]

    def randint(self, high: int) -> torch.Tensor:
        x = torch.randint(0, high, (self.global_batch,), generator=self.generator, device=self.device)
        return x[self.rows]


class Objective(nn.Module):
    """Base class: ``forward(batch, noise) -> loss``; subclasses say what is trained."""

    #: whether FSDP may shard it: its export reads its trained modules alone (a VAE's or a base's
    #: reads the whole model)
    shardable = True

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules whose trainable parameters the checkpoint saves, by name."""
        raise NotImplementedError

    def param_groups(self, lr: float, decoder_lr: float) -> list[dict[str, Any]]:
        raise NotImplementedError

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move to ``device``: frozen parts in ``weight_dtype`` (saves memory under mixed
        precision), trained parts in float32 (the optimizer's master weights)."""
        raise NotImplementedError

    def networks(self) -> list[nn.Module]:
        """The networks that run every step (what ``--compile`` compiles)."""
        return list(self.trainable_modules().values())

    @property
    def _no_split_modules(self) -> list[str]:
        """The block classes of its networks, which FSDP shards as units of their own (accelerate's
        transformer wrap policy reads this): those each model class names (diffusers'
        ``_no_split_modules``), as instantiated (our fused blocks are subclasses of the named)."""
        inner = [m for m in self.modules() if m is not self]
        named = {n for m in inner for n in getattr(m, "_no_split_modules", None) or ()}
        return sorted({type(m).__name__ for m in inner if any(c.__name__ in named for c in type(m).__mro__)})

    def enable_gradient_checkpointing(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable weights (and buffers of trained modules) keyed ``module.name``."""
        out: dict[str, torch.Tensor] = {}
        for mname, module in self.trainable_modules().items():
            params = dict(module.named_parameters())
            for n, t in module.state_dict().items():
                if n not in params or params[n].requires_grad:  # trained weights, and buffers
                    out[f"{mname}.{n}"] = t
        return out

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        """Load whole tensors (a checkpoint's) into the trained weights, sharded or not."""
        expected = self.trainable_state()
        missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this run: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
        with torch.no_grad():
            for k, v in sd.items():
                if expected[k].shape != v.shape:
                    raise ValueError(
                        f"checkpoint tensor {k} has shape {tuple(v.shape)}, "
                        f"expected {tuple(expected[k].shape)}"
                    )
                assign(expected[k], v)


class DiffusionInputs:
    """Turns a batch into (noisy latents, timesteps, prompt embeddings, regression target)."""

    def __init__(self, base: BaseModel, empty_prompt_prob: float, noise_offset: float = 0.0) -> None:
        if not 0.0 <= empty_prompt_prob <= 1.0:
            raise ValueError(f"empty-prompt probability must be in [0, 1], got {empty_prompt_prob}")
        if not noise_offset >= 0.0:
            raise ValueError(f"noise offset must be >= 0, got {noise_offset}")
        self.base = base
        self.empty_prompt_prob = empty_prompt_prob
        #: std of a per-image, per-channel constant added to the training noise ("offset noise"):
        #: with SD's schedules the last timestep still carries the image's mean colour, so a model
        #: trained on plain noise reads its colours from the starting noise instead of the prompt
        self.noise_offset = noise_offset
        self.scheduler = base.noise_scheduler()
        #: the empty prompt's embeddings, when batches carry cached ones (``CachedDataset.empty``)
        self.empty: PromptEmbeddings | None = None

    def latents(self, batch: dict[str, Any], noise: StepNoise) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior (or from cached posterior moments)."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        else:
            with torch.no_grad():
                dist = self.base.posterior(batch["target"], per_image=False)
            mean, std = dist.mean.float(), dist.std.float()
        return self.base.scaled_sample(mean, std, noise.randn(*mean.shape[1:]))

    def prompts(self, prompts: Sequence[str], noise: StepNoise) -> list[str]:
        """Replace each prompt by "" with the empty-prompt probability (paper: 50%)."""
        drop = noise.host_rand() < self.empty_prompt_prob
        return ["" if d else p for p, d in zip(prompts, drop.tolist())]

    def embeddings(self, batch: dict[str, Any], prompts: list[str]) -> PromptEmbeddings:
        if "context" not in batch:
            return self.base.encode_prompt(prompts)
        # cached embeddings: dropped prompts take the cache's empty-prompt embeddings
        if self.empty is None:
            raise ValueError(
                "batches with cached prompt embeddings need DiffusionInputs.empty (CachedDataset.empty)"
            )
        device = batch["context"].device
        if self.empty.context.device != device:  # once: a copy from the host each step would stall it
            e = self.empty
            added_empty = None if e.added is None else {k: v.to(device) for k, v in e.added.items()}
            self.empty = PromptEmbeddings(e.context.to(device), added_empty)
        keep = torch.tensor([p != "" for p in prompts]).to(device, non_blocking=True)
        ctx = torch.where(keep[:, None, None], batch["context"], self.empty.context)
        added = None
        if batch.get("added") is not None:
            assert self.empty.added is not None
            added = {
                k: torch.where(keep[:, None], v, self.empty.added[k].to(v.dtype))
                for k, v in batch["added"].items()
            }
        return PromptEmbeddings(ctx.to(self.base.dtype), added)

    def noised(
        self, latents: torch.Tensor, noise: StepNoise
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, regression target: the noise, v for v-prediction, or the
        velocity for a flow-matching family)."""
        eps = noise.randn(*latents.shape[1:])
        if self.noise_offset:
            eps = eps + self.noise_offset * noise.randn(latents.shape[1], 1, 1)
        return self.scheduler.draw_noised(latents, eps, noise)  # the family's own draw and target

    def __call__(
        self, batch: dict[str, Any], noise: StepNoise
    ) -> tuple[torch.Tensor, torch.Tensor, PromptEmbeddings, torch.Tensor]:
        latents = self.latents(batch, noise)
        noisy, t, target = self.noised(latents, noise)
        emb = self.embeddings(batch, self.prompts(batch["prompt"], noise))
        return noisy, t, emb, target


def as_condition(cond: torch.Tensor) -> torch.Tensor:
    """A batch of condition images as the model reads them: uint8 maps (as a latent cache stores
    them) become floats in [0, 1]; float maps pass unchanged."""
    return cond.float() / 255.0 if cond.dtype == torch.uint8 else cond


class ControlNetObjective(Objective):
    """The paper's loss, E||eps - eps_theta(z_t, t, c_text, c_image)||^2, training the ControlNet
    (and, with ``sd_locked=False``, the UNet decoder too); for a flow-matching family the same with
    the velocity as the target (:class:`~controlnet.families.flow_match.FlowMatchTraining`)."""

    def __init__(
        self,
        base: BaseModel,
        controlnet: ControlNet,
        *,
        only_mid_control: bool = False,
        sd_locked: bool = True,
        empty_prompt_prob: float = 0.5,
        noise_offset: float = 0.0,
        control_mode: int | None = None,
    ) -> None:
        super().__init__()
        self.model = base.controlled(controlnet, only_mid_control=only_mid_control, control_type=control_mode)
        #: a Union ControlNet's mode for the data (the kind of condition it holds), or None
        self.control_mode = control_mode
        self.sd_locked = sd_locked
        if not sd_locked:
            for _, p in base.decoder_parameters():
                p.requires_grad_(True)
        self.inputs = DiffusionInputs(base, empty_prompt_prob, noise_offset)

    @property
    def controlnet(self) -> ControlNet:
        return self.model.controlnet

    def networks(self) -> list[nn.Module]:
        return [self.inputs.base.denoiser, self.model.controlnet]

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"controlnet": self.model.controlnet}
        if not self.sd_locked:
            mods["unet"] = self.inputs.base.denoiser
        return mods

    def param_groups(self, lr: float, decoder_lr: float) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": list(self.model.controlnet.parameters()), "lr": lr}]
        if not self.sd_locked:
            groups.append({"params": [p for _, p in self.inputs.base.decoder_parameters()], "lr": decoder_lr})
        return groups

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        base = self.inputs.base
        base.to(device, weight_dtype)
        if not self.sd_locked:  # the decoder trains: its master weights stay float32
            base.denoiser.to(device, torch.float32)
        self.model.controlnet.to(device, torch.float32)

    def forward(self, batch: dict[str, Any], noise: StepNoise) -> torch.Tensor:
        noisy, t, emb, target = self.inputs(batch, noise)
        cond = as_condition(batch["cond"].to(noisy.device))
        pred = self.model(noisy.to(self.inputs.base.dtype), t, emb.context, cond, added_cond_kwargs=emb.added)
        return F.mse_loss(pred.float(), target.float())


class VaeObjective(Objective):
    """Stage 1 of a base model: the autoencoder. L1 + L2 reconstruction of the image through a
    posterior sample, plus a small KL term that keeps the latent space regular (as SD's VAE)."""

    shardable = False

    def __init__(self, base: BaseModel, *, kl_weight: float = 1e-4) -> None:
        super().__init__()
        self.base = base
        self.vae = base.vae.requires_grad_(True).train()
        self.kl_weight = kl_weight

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def networks(self) -> list[nn.Module]:
        # a step runs the VAE through encode() and decode(), never its forward(): what runs (and
        # what --compile must compile) is its encoder and decoder
        return [self.vae.encoder, self.vae.decoder]

    def param_groups(self, lr: float, decoder_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.vae.parameters()), "lr": lr}]

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.base.to(device, torch.float32)  # (the rest comes along: a base reads images where it runs)

    def forward(self, batch: dict[str, Any], noise: StepNoise) -> torch.Tensor:
        x = batch["target"].float()
        post = self.base.posterior(x, per_image=False)
        z = post.mean + post.std * noise.randn(*post.mean.shape[1:])
        rec = self.vae.decode(z).sample
        kl = post.kl().sum() / x.numel()
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + self.kl_weight * kl


class BaseObjective(Objective):
    """Stage 2 of a base model: text-to-image diffusion, training the network (a UNet, or a
    transformer with flow matching) and, for a one-encoder UNet stack, the text encoder together
    (the VAE stays frozen). Prompts are dropped to "" with ``empty_prompt_prob`` so the model also
    learns the unconditional prediction classifier-free guidance needs."""

    shardable = False

    def __init__(
        self,
        base: BaseModel,
        *,
        empty_prompt_prob: float = 0.1,
        noise_offset: float = 0.0,
        train_text_encoder: bool = True,
    ) -> None:
        super().__init__()
        one_clip = getattr(base, "unet", None) is not None and base.text_encoder_2 is None
        if train_text_encoder and not one_clip:
            raise ValueError(
                "training the text encoders with the network is supported for one-encoder UNet stacks "
                "(SD1.x / SD2.x); use train_text_encoder=False"
            )
        #: the network's name in the base (``unet`` / ``transformer``): its checkpoint key
        self.network_name = next(n for n, m in base.modules().items() if m is base.denoiser)
        self.network = base.denoiser.requires_grad_(True).train()
        self.train_text_encoder = train_text_encoder
        self.text_encoder = base.text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
        self.inputs = DiffusionInputs(base, empty_prompt_prob, noise_offset)

    def trainable_modules(self) -> dict[str, nn.Module]:
        if not self.train_text_encoder:
            return {self.network_name: self.network}
        return {self.network_name: self.network, "text_encoder": self.text_encoder}

    def param_groups(self, lr: float, decoder_lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for m in self.trainable_modules().values() for p in m.parameters()], "lr": lr}]

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        base = self.inputs.base
        base.to(device, weight_dtype)
        for m in self.trainable_modules().values():
            m.to(device, torch.float32)

    def forward(self, batch: dict[str, Any], noise: StepNoise) -> torch.Tensor:
        base = self.inputs.base
        latents = self.inputs.latents(batch, noise)
        noisy, t, target = self.inputs.noised(latents, noise)
        prompts = self.inputs.prompts(batch["prompt"], noise)
        if self.train_text_encoder:  # with gradients, unlike encode_prompt
            emb = PromptEmbeddings(self.text_encoder(base.tokenize(prompts)).last_hidden_state)
        else:
            emb = self.inputs.embeddings(batch, prompts)
        pred = base.predict(
            noisy.to(self.network.dtype), t, emb.context.to(self.network.dtype), added=emb.added
        )
        return F.mse_loss(pred.float(), target.float())
