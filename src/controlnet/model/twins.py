"""A ControlNet's twins: the tensors made as copies of the locked network's (the paper's trainable
copy), by name and shape, and moving them from one network to another of the same architecture
(``controlnet transfer``). The zero layers and the condition's encoder (``controlnet_*``) are no
twins: a UNet ControlNet and a transformer one name theirs alike."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["transfer_twins", "twins"]


def twins(controlnet: nn.Module, network: nn.Module) -> list[str]:
    """The tensors of ``controlnet`` made as copies of the locked ``network``'s: those with a twin
    of the same name and shape there (the copied blocks, embedders), not the zero layers
    (``controlnet_*``) nor what the ControlNet alone has."""
    state = network.state_dict()
    return [
        k
        for k, t in controlnet.state_dict().items()
        if k in state and state[k].shape == t.shape and not k.startswith("controlnet_")
    ]


def transfer_twins(controlnet: nn.Module, a: nn.Module, b: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``controlnet`` (trained beside network ``a``) moved to network ``b`` of the
    same architecture: ``control + (b - a)`` on each of its :func:`twins`, computed in float32 (or
    wider, where an input is) and stored in the ControlNet's dtype; the rest kept. Empty when it
    has no twin (nothing of it was copied from the network)."""
    names = twins(controlnet, a)
    if not names:
        return {}
    sa, sb = a.state_dict(), b.state_dict()
    out = {k: t.detach().clone() for k, t in controlnet.state_dict().items()}
    for k in names:
        c = out[k]
        work = torch.promote_types(torch.promote_types(c.dtype, sa[k].dtype), sb[k].dtype)
        work = torch.promote_types(work, torch.float32)
        out[k] = (c.to(work) + (sb[k].to(work) - sa[k].to(work))).to(c.dtype)
    return out
