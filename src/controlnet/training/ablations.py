"""The variants the paper compares ControlNet against (section 4.3, figure 8), for our small-scale
reproduction. None of these is meant for production use.

- ``gaussian``: ControlNet whose connection layers (the 14 zero convs) start from Gaussian weights
  instead of zeros: training no longer starts from exactly the base model.
- ``lite``: "ControlNet-lite": the trainable copy of the encoder is replaced by one light conv
  per residual level; same residual interface, far fewer parameters.
- ``concat``: no ControlNet: the base UNet is fine-tuned with the condition (resized to the
  latent grid) as extra input channels, zero-initialised so training starts from the base model.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from ..families.protocol import BaseModel
from ..families.sd.controlnet import ControlNet, ControlNetConfig, HintEncoder, residual_channels
from ..model.zero import ControlledCopy, zero_conv
from .objectives import DiffusionInputs, Objective, StepNoise, as_condition

__all__ = ["ConcatObjective", "ConcatUNet", "LiteControlNet", "gaussian_connections"]


def gaussian_connections(controlnet: ControlNet, std: float = 0.02, seed: int = 0) -> ControlNet:
    """Re-initialise the 14 connection layers with N(0, std^2) weights and zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in controlnet.zero_convs():
            w = torch.randn(layer.weight.shape, generator=g) * std
            layer.weight.copy_(w.to(layer.weight))
            layer.bias.zero_()
    return controlnet


class LiteControlNet(ControlledCopy):
    """ControlNet-lite: hint encoder + latent input conv, then ONE narrow conv per residual (a
    quarter of the UNet's width, stride 2 where the UNet halves its resolution) instead of the
    trainable encoder copy; zero convs widen each to the UNet's channels. The same formula with
    another F (:class:`~controlnet.model.zero.ControlledCopy`): it returns residuals of the same
    shapes as :class:`ControlNet`, so injection is unchanged."""

    def __init__(self, unet: UNet2DConditionModel, config: ControlNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or ControlNetConfig()
        self.unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        chans = residual_channels(unet)
        strides = [1]
        for block in unet.down_blocks:
            strides += [1] * len(block.resnets)
            if block.downsamplers is not None:
                strides.append(2)
        c0 = unet.conv_in.out_channels
        mid = unet.config.block_out_channels[-1]
        widths = [max(8, c // 4) for c in [*chans, mid]]  # narrow features; the zero convs widen them
        self.conv_in = nn.Conv2d(unet.config.in_channels, c0, 3, padding=1)
        self.controlnet_cond_embedding = HintEncoder(
            self.config.hint_channels, self.config.hint_block_channels, c0
        )
        self.convs = nn.ModuleList([nn.Conv2d(c0, widths[0], 1)])
        for i, s in enumerate(strides[1:], start=1):
            self.convs.append(nn.Conv2d(widths[i - 1], widths[i], 3, stride=s, padding=1))
        self.mid = nn.Conv2d(widths[-2], widths[-1], 3, padding=1)
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(w, c) for w, c in zip(widths, chans))
        self.controlnet_mid_block = zero_conv(widths[-1], mid)
        self.to(unet.conv_in.weight)

    num_residuals = ControlNet.num_residuals
    zero_convs = ControlNet.zero_convs
    encode_hint = ControlNet.encode_hint
    condition_layer = ControlNet.condition_layer
    output_layers = ControlNet.output_layers

    def copy_forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """One narrow conv per residual level, then the middle's."""
        feats = []
        for conv in self.convs:
            h = F.silu(conv(h))
            feats.append(h)
        return [*feats, F.silu(self.mid(h))]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor,
        added_cond_kwargs: Any = None,
        cross_attention_kwargs: Any = None,
    ) -> list[torch.Tensor]:
        # like ControlNet.forward: its inputs take its own dtype (a float32 copy trains next to a
        # bfloat16 UNet)
        return self.residuals(self.conv_in(sample.to(self.dtype)), hint.to(self.dtype))


class ConcatUNet(nn.Module):
    """A UNet whose input conv also reads the condition resized to the latent grid (extra input
    channels, zero-initialised: at the start it is exactly the base UNet). Set ``cond`` before use;
    it then behaves as a plain UNet for the sampler (``config.in_channels`` is the latent's)."""

    def __init__(self, unet: UNet2DConditionModel, cond_channels: int = 3) -> None:
        super().__init__()
        self.unet = copy.deepcopy(unet)
        old = self.unet.conv_in
        latent = old.in_channels
        new = nn.Conv2d(latent + cond_channels, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :latent].copy_(old.weight)
            new.bias.copy_(old.bias)
        self.unet.conv_in = new.to(old.weight)
        self.config = SimpleNamespace(**{**dict(unet.config), "in_channels": latent})
        self.cond: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def conv_in(self) -> nn.Conv2d:
        return self.unet.conv_in

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        if self.cond is None:
            raise ValueError("ConcatUNet needs .cond set to the condition images before it runs")
        c = F.interpolate(self.cond.to(sample), size=sample.shape[-2:], mode="area")
        c = (
            c.expand(sample.shape[0], -1, -1, -1)
            if c.shape[0] == 1
            else c.repeat(sample.shape[0] // c.shape[0], 1, 1, 1)
        )
        return self.unet(
            torch.cat([sample, c], 1),
            timestep,
            encoder_hidden_states,
            *args,
            return_dict=return_dict,
            **kwargs,
        )


class ConcatObjective(Objective):
    """Fine-tune the whole UNet with the condition as extra input channels (ablation ``concat``)."""

    def __init__(self, base: BaseModel, *, empty_prompt_prob: float = 0.5, noise_offset: float = 0.0) -> None:
        super().__init__()
        self.model = ConcatUNet(base.unet).requires_grad_(True)
        self.inputs = DiffusionInputs(base, empty_prompt_prob, noise_offset)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet}

    def param_groups(self, lr: float, decoder_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "lr": lr}]

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.inputs.base.to(device, weight_dtype)
        self.model.to(device, torch.float32)

    def forward(self, batch: dict[str, Any], noise: StepNoise) -> torch.Tensor:
        noisy, t, emb, target = self.inputs(batch, noise)
        self.model.cond = as_condition(batch["cond"])
        pred = self.model(noisy, t, emb.context, added_cond_kwargs=emb.added).sample
        return F.mse_loss(pred.float(), target.float())
