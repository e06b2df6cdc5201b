"""A ControlNet's twins: the tensors made as copies of the locked network's (the paper's trainable
copy), by name and shape, and moving them from one network to another of the same architecture
(``controlnet transfer``). The zero layers and the condition's encoder (``controlnet_*``) are no
twins: a UNet ControlNet and a transformer one name theirs alike."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["transfer_twins", "twins"]


def twins(controlnet: nn.Module, network: nn.Module) -> dict[str, str]:
    """The tensors of ``controlnet`` made as copies of the locked ``network``'s, each with the name
    of its original there: those with a twin of the same shape, not the zero layers
    (``controlnet_*``) nor what the ControlNet alone has. A twin has the same name, unless the
    ControlNet says where its copies came from (``controlnet.twin_of(name)``: the original's name,
    or None; Z-Image's control blocks copy main layers placed among the base's)."""
    state = network.state_dict()
    where = getattr(controlnet, "twin_of", None)
    found: dict[str, str] = {}
    for k, t in controlnet.state_dict().items():
        if k.startswith("controlnet_"):
            continue
        src = where(k) if where is not None else k
        if src is not None and src in state and state[src].shape == t.shape:
            found[k] = src
    return found


def transfer_twins(controlnet: nn.Module, a: nn.Module, b: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``controlnet`` (trained beside network ``a``) moved to network ``b`` of the
    same architecture: ``control + (b - a)`` on each of its :func:`twins`, computed in float32 (or
    wider, where an input is) and stored in the ControlNet's dtype; the rest kept. Empty when it
    has no twin (nothing of it was copied from the network)."""
    pairs = twins(controlnet, a)
    if not pairs:
        return {}
    sa, sb = a.state_dict(), b.state_dict()
    out = {k: t.detach().clone() for k, t in controlnet.state_dict().items()}
    for k, src in pairs.items():
        c = out[k]
        work = torch.promote_types(torch.promote_types(c.dtype, sa[src].dtype), sb[src].dtype)
        work = torch.promote_types(work, torch.float32)
        out[k] = (c.to(work) + (sb[src].to(work) - sa[src].to(work))).to(c.dtype)
    return out
