"""The Z-Image ControlNet (issue 34): the paper's controlled copy placed among a single-stream
transformer's layers, our own code.

Z-Image's transformer embeds the image tokens and refines them (``noise_refiner``), refines the
caption (``context_refiner``), then runs one sequence of both through its main layers. Its
ControlNet (Alibaba PAI's Union ControlNets, diffusers' ``ZImageControlNetModel``) holds copies of
transformer blocks, each a control block: the first adds the image sequence to the condition's
tokens through a zero-initialised ``before_proj``, and each gives the base a residual through a
zero-initialised ``after_proj``, added after main layer ``control_layers_places[i]``. The
condition enters as VAE latents through ``control_all_x_embedder``. Before the main stage it is
refined, as the published models choose (diffusers' ``add_control_noise_refiner``):

- ``None``: by plain transformer blocks of its own (``control_noise_refiner``), alone;
- ``"control_noise_refiner"``: by control blocks of its own, which also give residuals to the
  image's noise refiner (``control_refiner_layers_places``), so the ControlNet's view of the image
  differs from the base's;
- ``"control_layers"``: by the main control blocks themselves, likewise.

The base's parts the ControlNet reads (embedders, refiners, pad token) stay the base's: they are
passed in (:class:`Sequences`), not copied, and where the ControlNet's view of the image equals
the base's (``None``) the base's refined sequences are reused rather than computed again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from torch import nn

from ...model.zero import zero_linear
from ..dit import copy_twins
from .fused import FusedZImageBlock
from .sequence import Sequences, unify

__all__ = ["REFINERS", "ZIMAGE_FIELDS", "ZImageControlBlock", "ZImageControlNet", "ZImageControlNetConfig"]

#: how the condition is refined before the main stage (diffusers' ``add_control_noise_refiner``)
REFINERS = (None, "control_noise_refiner", "control_layers")
#: the transformer fields a ControlNet's blocks are built from
ZIMAGE_FIELDS = ("dim", "n_heads", "n_kv_heads", "norm_eps", "qk_norm", "n_refiner_layers", "in_channels")
#: diffusers' defaults of those fields (ZImageTransformer2DModel: Z-Image's released shape)
_DEFAULTS = {
    "dim": 3840,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "n_refiner_layers": 2,
    "in_channels": 16,
}


@dataclass(frozen=True)
class ZImageControlNetConfig:
    #: the main layers after which each control block's residual is added (the first must be 0)
    control_layers_places: tuple[int, ...] = (0, 5, 10, 15, 20, 25)
    #: the noise-refiner layers given residuals (refiners other than None)
    control_refiner_layers_places: tuple[int, ...] | None = None
    #: the condition's channels (its latents, zero-padded to this many)
    control_in_dim: int = 16
    refiner: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "control_layers_places", tuple(self.control_layers_places))
        if self.control_refiner_layers_places is not None:
            object.__setattr__(
                self, "control_refiner_layers_places", tuple(self.control_refiner_layers_places)
            )
        if 0 not in self.control_layers_places:
            raise ValueError(f"control_layers_places must hold 0 (got {list(self.control_layers_places)})")
        if self.refiner not in REFINERS:
            raise ValueError(f"refiner must be one of {list(REFINERS)}, got {self.refiner!r}")
        if self.refiner is not None and not self.control_refiner_layers_places:
            raise ValueError(f"refiner {self.refiner!r} needs control_refiner_layers_places")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZImageControlNetConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class ZImageControlBlock(FusedZImageBlock):
    """A copy of a Z-Image transformer block that reads the condition's tokens ``c``: the first
    of a chain adds the image sequence ``x`` through ``before_proj``; each returns its residual
    for the base through ``after_proj`` beside the tokens it passes on (both projections start
    at zero)."""

    def __init__(self, t: dict[str, Any], *, first: bool) -> None:
        dim = t["dim"]
        super().__init__(0, dim, t["n_heads"], t["n_kv_heads"], t["norm_eps"], t["qk_norm"], modulation=True)
        if first:
            self.before_proj = zero_linear(dim, dim)
        self.after_proj = zero_linear(dim, dim)

    def control(
        self, c: torch.Tensor, x: torch.Tensor, mask: Any, freqs: torch.Tensor, adaln: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tokens passed on, the residual)."""
        if hasattr(self, "before_proj"):
            c = self.before_proj(c) + x
        c = self(c, mask, freqs, adaln)
        return c, self.after_proj(c)


class ZImageControlNet(nn.Module):
    """Control blocks placed among a Z-Image transformer's main layers (module docstring); its
    state dict is diffusers' ``ZImageControlNetModel``'s own keys (``control_*``)."""

    def __init__(
        self,
        transformer_config: dict[str, Any],
        config: ZImageControlNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or ZImageControlNetConfig()
        self.config = config
        self.transformer_config = {
            **_DEFAULTS,
            **{k: v for k, v in transformer_config.items() if k in ZIMAGE_FIELDS},
        }
        t = self.transformer_config
        dim, patch = t["dim"], (2, 1)  # Z-Image's one patch size (2x2, one frame)
        with torch.device(device or "cpu"):
            self.control_layers = nn.ModuleList(
                [ZImageControlBlock(t, first=place == 0) for place in config.control_layers_places]
            )
            embedder = nn.Linear(patch[1] * patch[0] ** 2 * config.control_in_dim, dim)
            self.control_all_x_embedder = nn.ModuleDict({f"{patch[0]}-{patch[1]}": embedder})
            n = t["n_refiner_layers"]
            if config.refiner is None:  # plain blocks (fused: the same arithmetic in fewer kernels)
                block = FusedZImageBlock
                self.control_noise_refiner = nn.ModuleList(
                    [
                        block(0, dim, t["n_heads"], t["n_kv_heads"], t["norm_eps"], t["qk_norm"])
                        for _ in range(n)
                    ]
                )
            elif config.refiner == "control_noise_refiner":
                self.control_noise_refiner = nn.ModuleList(
                    [ZImageControlBlock(t, first=i == 0) for i in range(n)]
                )

    @property
    def num_residuals(self) -> int:
        return len(self.config.control_layers_places)

    def twin_of(self, name: str) -> str | None:
        """The base transformer's tensor that this ControlNet's tensor ``name`` starts as a copy of
        (:func:`controlnet.model.twins.twins`): a control block's, the main layer it is placed at;
        a refiner block's, the image's noise-refiner layer of its index (what a control block
        adds, and the condition's embedder, have none there)."""
        kind, _, rest = name.partition(".")
        index, _, tensor = rest.partition(".")
        if kind == "control_layers":
            return f"layers.{self.config.control_layers_places[int(index)]}.{tensor}"
        if kind == "control_noise_refiner":
            return f"noise_refiner.{index}.{tensor}"
        return None

    @property
    def embedder(self) -> nn.Linear:
        return next(iter(self.control_all_x_embedder.values()))

    def forward(self, s: Sequences, control: torch.Tensor, strength: float = 1.0) -> dict[int, torch.Tensor]:
        """The residual for each main layer in ``control_layers_places``, by layer (unscaled),
        for the batch ``s`` and the condition's patch tokens ``control`` (B, image tokens, patch
        channels), padded as the image is. ``strength`` scales what the refiner blocks add to the
        ControlNet's own pass through the image's noise refiner (as the conditioning scale does
        in diffusers' model): it acts before any main layer."""
        b, n, _ = control.shape
        c = self.embedder(control).reshape(b * n, -1)
        c = torch.where(s.x_pad[:, None], s.transformer.x_pad_token.to(c.dtype), c).reshape(b, n, -1)
        unified = s.unified
        if self.config.refiner is None:
            for block in self.control_noise_refiner:
                c = block(c, s.x_mask, s.x_freqs, s.adaln)
        else:  # the condition steers the ControlNet's own pass through the image's noise refiner
            blocks = (
                self.control_layers if self.config.refiner == "control_layers" else self.control_noise_refiner
            )
            hints = []
            for block in blocks:
                c, skip = block.control(c, s.x_in, s.x_mask, s.x_freqs, s.adaln)
                hints.append(skip)
            places = {i: h * strength for i, h in zip(self.config.control_refiner_layers_places or (), hints)}
            x = s.x_in
            for i, layer in enumerate(s.transformer.noise_refiner):
                x = layer(x, s.x_mask, s.x_freqs, s.adaln)
                if i in places:
                    x = x + places[i]
            unified = unify(x, s.cap, s.x_lens, s.cap_lens)
        c = unify(c, s.cap, s.x_lens, s.cap_lens)
        out = {}
        for place, block in zip(self.config.control_layers_places, self.control_layers):
            c, out[place] = block.control(c, unified, s.unified_mask, s.unified_freqs, s.adaln)
        return out

    @classmethod
    def from_transformer(
        cls, transformer: ZImageTransformer2DModel, config: ZImageControlNetConfig | None = None
    ) -> ZImageControlNet:
        """A fresh ControlNet for ``transformer``: each control block a copy of the main layer it
        is placed at, each refiner block a copy of the image's noise-refiner layer, the
        projections zero (paper section 3.1: the first block reads x + Z_in(c), each residual
        leaves through Z_out), so the base's output is unchanged until trained. The condition's
        embedder starts as made: it feeds a zero layer, and two zeros in a row would not learn."""
        config = config or ZImageControlNetConfig()
        like = next(transformer.parameters())
        cn = cls(dict(transformer.config), config, device=like.device)
        copy_twins(cn, transformer)  # (where each block's twin is: twin_of)
        return cn
