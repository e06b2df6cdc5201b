"""How control enters a locked UNet, for sampling and for training.

ControlNet residuals go to the skips and the middle block; T2I-Adapter features inside the
encoder's levels; the conditions of one Union ControlNet run in one pass.

The locked UNet adds residual i to its i-th skip connection before the decoder concatenates it,
and the last residual to the middle block's output (diffusers' ``down_block_additional_residuals``
/ ``mid_block_additional_residual``). With ``concurrent``, the UNet's encoder half and each
ControlNet run on parallel CUDA streams (none needs another's output), then the decoder half takes
the residuals (:mod:`.halves`): the same operations, so the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ...model.control import (
    Control,
    conditional_half,
    control_scales,
    residual_functions,
    scaled,
    sum_residuals,
    zero_first_half,
)
from ...model.fastpath import run_concurrently
from .controlnet import ControlNet
from .halves import halves
from .union import UnionControlNet

__all__ = ["ControlledUNet", "controlled_unet_forward", "decoder_parameters"]


def controlled_unet_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    controls: Sequence[Control] = (),
    *,
    cfg_batch: bool = False,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    concurrent: bool = False,
) -> torch.Tensor:
    """The locked UNet's noise prediction with the controls' residuals injected.

    ``concurrent``: the UNet's encoder half and each ControlNet run on parallel CUDA streams (none
    of them needs another's output), then the UNet's decoder half takes the residuals
    (:mod:`controlnet.families.sd.halves`); the operations, and so the results, are the same as in the
    plain order, in which the UNet's forward takes them as ``down_block_additional_residuals`` /
    ``mid_block_additional_residual``.
    """
    added = dict(added_cond_kwargs) if added_cond_kwargs is not None else None
    inside = [c for c in controls if getattr(c.controlnet, "injection", None) == "intrablock"]
    controls = [c for c in controls if getattr(c.controlnet, "injection", None) != "intrablock"]
    kwargs: dict[str, Any] = {}
    adapters = residual_functions(inside, sample, timestep, encoder_hidden_states, cfg_batch, added)
    if adapters:  # T2I-Adapters: their features go inside the encoder's levels (diffusers' argument)
        kwargs["down_intrablock_additional_residuals"] = sum_residuals([fn() for fn in adapters])
        concurrent = False  # (the split UNet takes skip residuals only)
    unions = [c for c in controls if isinstance(c.controlnet, UnionControlNet)]
    controls = [c for c in controls if not isinstance(c.controlnet, UnionControlNet)]
    fns = residual_functions(controls, sample, timestep, encoder_hidden_states, cfg_batch, added)
    fns += union_functions(unions, sample, timestep, encoder_hidden_states, cfg_batch, added)
    if concurrent and fns:
        encoder, decoder = halves(unet)
        features, *each = run_concurrently(
            [partial(encoder, sample, timestep, encoder_hidden_states, added), *fns], sample.device
        )
        return decoder(features, encoder_hidden_states, sum_residuals(each))
    if fns:
        res = sum_residuals([fn() for fn in fns])
        kwargs["down_block_additional_residuals"] = tuple(res[:-1])
        kwargs["mid_block_additional_residual"] = res[-1]
    return unet(
        sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False, **kwargs
    )[0]


def union_functions(
    controls: Sequence[Control],
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    context: torch.Tensor,
    cfg_batch: bool,
    added: Mapping[str, torch.Tensor] | None,
) -> list[Callable[[], list[torch.Tensor]]]:
    """One function per Union ControlNet (and per half it runs on) giving the residuals of all its
    active conditions from one pass (:meth:`UnionControlNet.forward_union`). A condition alone keeps
    its per-residual scales and its region; several are each scaled by their strength inside the
    network, and a region mask has no place among them (refused)."""
    groups: dict[tuple[int, bool], list[Control]] = {}
    for c in controls:
        if c.active:
            groups.setdefault((id(c.controlnet), c.conditional_only and cfg_batch), []).append(c)

    def run(group: list[Control], half: bool) -> list[torch.Tensor]:
        cn: UnionControlNet = group[0].controlnet  # type: ignore[assignment]
        x, t, ctx, add = (
            conditional_half(sample, timestep, context, added) if half else (sample, timestep, context, added)
        )
        one = len(group) == 1
        if not one and any(c.region is not None for c in group):
            raise ValueError(
                "region masks: a Union ControlNet's conditions run in one pass; give a region mask "
                "only where it takes one condition"
            )
        types = [c.control_type if c.control_type is not None else -1 for c in group]
        strengths = [1.0] if one else [c.scales[-1] for c in group]
        res = cn.forward_union(x, t, ctx, [c.hint for c in group], types, strengths, add)
        if half:
            res = zero_first_half(res)
        # one condition: its per-residual scales and region, as any ControlNet's
        return scaled(group[0], res, sample.dtype) if one else [r.to(sample.dtype) for r in res]

    return [partial(run, group, half) for (_, half), group in groups.items()]


class ControlledUNet(nn.Module):
    """A locked UNet with one trainable ControlNet: the model the training loss is taken on.

    The UNet's parameters are frozen. Its encoder therefore builds no autograd state (none of its
    inputs needs a gradient), while the loss's gradient flows through the decoder into the
    residuals and on into the ControlNet.
    """

    def __init__(
        self, unet: UNet2DConditionModel, controlnet: ControlNet, *, only_mid_control: bool = False
    ) -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.controlnet = controlnet
        self.only_mid_control = only_mid_control

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cond: torch.Tensor,
        strength: float = 1.0,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Noise prediction for latents (B, C, h, w) with condition images (B, hint_channels, H, W)."""
        scales = control_scales(self.controlnet.num_residuals, strength, only_mid=self.only_mid_control)
        control = Control(self.controlnet, self.controlnet.encode_hint(cond), scales)
        return controlled_unet_forward(
            self.unet, sample, timestep, encoder_hidden_states, [control], added_cond_kwargs=added_cond_kwargs
        )


def decoder_parameters(unet: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The UNet decoder (up blocks and output layers): what ``sd_locked=False`` also trains."""
    prefixes = ("up_blocks.", "conv_norm_out.", "conv_out.")
    return [(n, p) for n, p in unet.named_parameters() if n.startswith(prefixes)]
