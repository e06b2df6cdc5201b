"""HED soft edges with the v1.1 network (ControlNetHED.pth, user-supplied).

The v1.1 HED network is a VGG-16-like stack of five conv blocks (2, 2, 3, 3, 3 convs of 64,
128, 256, 512, 512 channels, 3x3, ReLU; 2x2 max-pool before blocks 2-5) with a 1x1 "projection"
to one channel after each block, and a learned per-channel offset ``norm`` subtracted from the
RGB input (0..255). The five side outputs are resized to the image (bilinear), averaged and
passed through a sigmoid. Attribute names match the file's keys (``norm``,
``block1.convs.0.weight``, ``block1.projection.bias``, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .registry import Annotator, Param, ParamType
from .softedge import edge_map
from .weights import cached, default_device, find_weights, load_state_dict, load_strict

__all__ = ["HEDNet", "hed_edges", "load_hed"]

HED_GET = "ControlNetHED.pth (lllyasviel/Annotators on the Hugging Face Hub)"


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)]
        )
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    """forward: (B, 3, H, W) RGB in 0..255 -> five side outputs (B, 1, H / 2^k, W / 2^k) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _Block(3, 64, 2)
        self.block2 = _Block(64, 128, 2)
        self.block3 = _Block(128, 256, 3)
        self.block4 = _Block(256, 512, 3)
        self.block5 = _Block(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, pool=i > 0)
            sides.append(side)
        return sides


def _load(path: str, mtime: float) -> HEDNet:
    net = load_strict(HEDNet(), load_state_dict(Path(path)), "ControlNetHED.pth (HED)")
    return net.float().eval().to(default_device())


_load_cached = cached(_load)


def load_hed(weights: str = "ControlNetHED.pth") -> HEDNet:
    """The HED network with the user's weights (file name in the annotator folder, or a path)."""
    return _load_cached(find_weights(weights, what="HED", get=HED_GET))


@torch.no_grad()
def hed_edges(image: np.ndarray, weights: str | HEDNet = "ControlNetHED.pth") -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW float32 edge probability in [0, 1]."""
    net = weights if isinstance(weights, HEDNet) else load_hed(weights)
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1)[None].to(device)
    size = image.shape[:2]
    sides = [F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False) for s in net(x)]
    return torch.sigmoid(torch.cat(sides, 1).mean(1))[0].cpu().numpy()


def hed(image: np.ndarray, weights: str = "ControlNetHED.pth", safe: bool = False) -> np.ndarray:
    """HxWx3 uint8 -> HxW uint8 HED soft-edge map (``safe``: quantised to three levels)."""
    return edge_map(hed_edges(image, weights), safe)


WEIGHTS = Param(
    "weights", ParamType.STR, "ControlNetHED.pth", f"{HED_GET}: file name in the annotator folder, or a path"
)

ENTRIES = (
    Annotator(
        name="hed",
        description="HED soft edges (v1.1 network), grey on black",
        fn=hed,
        params=(WEIGHTS, Param("safe", ParamType.BOOL, False, "quantise to three levels (softedge_hedsafe)")),
        needs_weights=True,
    ),
)
