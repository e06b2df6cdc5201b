"""T2I-Adapter (Mou et al., 2023; TencentARC): the other way of adding spatial control to a locked
UNet, beside ControlNet. A small convolutional network reads the condition image once and gives one
feature map per level of the UNet's encoder; the UNet adds each inside its encoder (after the
level's last layer, before it downsamples; the last map after the middle block when one is left
over), at every step of the window, scaled by the adapter's weight. It does not read the noisy
latents, the timestep or the prompt: its features are the same at every step.

Our own module, in diffusers' ``T2IAdapter`` key layout (``adapter.conv_in``, ``adapter.body.i.
resnets.j.block1``, ...), in its three kinds: ``full`` (SD1.x/SD2.x), ``full_xl`` (SDXL) and
``light``. Called like a ControlNet - ``adapter(sample, timestep, context, hint, added)`` - it
returns its features; :attr:`T2IAdapter.injection` tells the UNet where they go.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..protocol import check_hint_scale

__all__ = ["AdapterConfig", "T2IAdapter"]

KINDS = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass
class AdapterConfig:
    """diffusers' ``T2IAdapter`` config, by its own names."""

    in_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self) -> None:
        if self.adapter_type not in KINDS:
            raise ValueError(f"adapter_type must be one of {', '.join(KINDS)}, got {self.adapter_type!r}")
        self.channels = [int(c) for c in self.channels]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Resnet(nn.Module):
    def __init__(self, channels: int, second_kernel: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class _Block(nn.Module):
    """A level: optional 2x average-pool, a 1x1 projection where the width changes, resnets
    (light: a quarter-width bottleneck between 1x1 convolutions)."""

    def __init__(self, cin: int, cout: int, resnets: int, *, down: bool, light: bool) -> None:
        super().__init__()
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        if light:
            mid = cout // 4
            self.in_conv = nn.Conv2d(cin, mid, 1)
            self.resnets = nn.Sequential(*[_Resnet(mid, 3) for _ in range(resnets)])
            self.out_conv: nn.Module | None = nn.Conv2d(mid, cout, 1)
        else:
            self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
            self.resnets = nn.Sequential(*[_Resnet(cout, 1) for _ in range(resnets)])
            self.out_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        return x if self.out_conv is None else self.out_conv(x)


class _Body(nn.Module):
    def __init__(self, c: AdapterConfig) -> None:
        super().__init__()
        ch, n, light = c.channels, c.num_res_blocks, c.adapter_type == "light_adapter"
        cin = c.in_channels * c.downscale_factor**2
        self.unshuffle = nn.PixelUnshuffle(c.downscale_factor)
        if light:
            self.conv_in = None
            levels = [(cin, ch[0], False)]
            levels += [(ch[i], ch[i + 1], True) for i in range(len(ch) - 1)]
            levels += [(ch[-1], ch[-1], True)]
        else:
            self.conv_in = nn.Conv2d(cin, ch[0], 3, padding=1)
            if c.adapter_type == "full_adapter_xl":  # SDXL: one downsampling, at the third level
                levels = [
                    (ch[max(i - 1, 0)] if i in (1, 2) else ch[i], ch[i], i == 2) for i in range(len(ch))
                ]
            else:
                levels = [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True) for i in range(1, len(ch))]
        self.body = nn.ModuleList([_Block(a, b, n, down=d, light=light) for a, b, d in levels])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(x)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """A T2I-Adapter (see the module's doc)."""

    #: where a UNet adds this model's outputs: inside its encoder's levels (a ControlNet's go to
    #: the skip connections and the middle block)
    injection = "intrablock"

    def __init__(self, config: AdapterConfig | None = None) -> None:
        super().__init__()
        self.config = config or AdapterConfig()
        self.adapter = _Body(self.config)

    @classmethod
    def for_unet(
        cls,
        unet_config: dict[str, Any],
        *,
        latent_factor: int = 8,
        in_channels: int = 3,
        num_res_blocks: int = 2,
    ) -> T2IAdapter:
        """A fresh adapter whose features fit a UNet of ``unet_config`` whose latents are
        ``latent_factor`` times smaller than the images: the full kind for SD1.x / SD2.x (a feature
        per level, as wide as the level), SDXL's kind for SDXL (its three levels, the last width
        twice). Drawn from the global RNG with PyTorch's default initialisation: unlike a
        ControlNet, an adapter has no zero layer, so it changes the base from its first step."""
        widths = [int(c) for c in unet_config["block_out_channels"]]
        if unet_config.get("addition_embed_type") == "text_time":
            if len(widths) != 3:
                raise ValueError(f"SDXL's T2I-Adapter fits a UNet of three levels, not {len(widths)}")
            channels = [*widths, widths[-1]]
            return cls(AdapterConfig(in_channels, channels, num_res_blocks, 2 * latent_factor, KINDS[1]))
        return cls(AdapterConfig(in_channels, widths, num_res_blocks, latent_factor, KINDS[0]))

    @property
    def num_residuals(self) -> int:
        return len(self.adapter.body)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_hint(self, image: torch.Tensor) -> torch.Tensor:
        """The condition as the adapter reads it: the image itself (checked now, before any step)."""
        self._checked(image)
        return image

    def check_unet(
        self, unet_config: dict[str, Any], *, name: str, base_name: str, latent_factor: int = 8
    ) -> None:
        """ValueError naming both unless this adapter's features fit a UNet of ``unet_config``
        whose VAE scales images down ``latent_factor`` times: SDXL's kind for an SDXL UNet (its
        encoder downsamples once less), widths as its levels', its first features on the latents'
        grid."""
        xl_unet = unet_config.get("addition_embed_type") == "text_time"
        xl = self.config.adapter_type == "full_adapter_xl"
        widths = [int(c) for c in unet_config.get("block_out_channels", ())]
        if xl != xl_unet:
            kinds = (
                ("an SDXL T2I-Adapter", "an SD1.x/SD2.x model")
                if xl
                else ("an SD1.x/SD2.x T2I-Adapter", "SDXL")
            )
            raise ValueError(f"{name} is {kinds[0]}, and {base_name} is {kinds[1]}")
        if self.config.channels[: len(widths)] != widths:
            raise ValueError(
                f"{name} gives features {self.config.channels} wide; {base_name}'s levels are {widths} wide"
            )
        factor = self.config.downscale_factor // (2 if xl else 1)
        check_hint_scale(factor, latent_factor, subject=name, base_name=base_name, to=" to the latents")

    def _checked(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[1] != self.config.in_channels:
            if self.config.in_channels != 1:
                raise ValueError(
                    f"this T2I-Adapter reads {self.config.in_channels}-channel images, got {image.shape[1]}"
                )
            image = image.mean(dim=1, keepdim=True)
        side = self.config.downscale_factor * (2 if self.config.adapter_type == "full_adapter_xl" else 1)
        if image.shape[-2] % side or image.shape[-1] % side:
            raise ValueError(
                f"a T2I-Adapter condition must have sides that are multiples of {side}, got "
                f"{tuple(image.shape[-2:])}"
            )
        return image

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps of a condition image (B, C, H, W) in [0, 1]; a one-channel adapter
        (sketch) reads the mean of the image's channels."""
        return self.adapter(self._checked(image).to(self.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor,
        added_cond_kwargs: Any = None,
    ) -> list[torch.Tensor]:
        """The features for a batch like ``sample`` (the hint broadcast over it); the latents, the
        timestep and the prompt are not read."""
        feats = self.features(hint)
        b = sample.shape[0]
        return [f.expand(b, *f.shape[1:]) if f.shape[0] == 1 else f for f in feats]
