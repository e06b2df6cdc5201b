"""Content shuffle (v1.1): the image remapped through a random smooth flow field, seeded.

Each output pixel samples the image at a position drawn from a smooth noise field: uniform noise
on a grid of ``cell``-pixel cells, upsampled bicubically and stretched to cover the image. The
layout is scrambled while colours and textures survive, which is what the shuffle model reads.
"""

from __future__ import annotations

import cv2
import numpy as np

from .registry import Annotator, Param, ParamType

__all__ = ["content_shuffle", "smooth_noise"]


def smooth_noise(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """HxW float32 noise in [0, 1], smooth over ``cell`` pixels (bicubic upsampling of a coarse grid)."""
    coarse = rng.uniform(0.0, 1.0, size=(height // cell + 2, width // cell + 2))
    fine = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    fine = fine[cell : cell + height, cell : cell + width]
    fine = fine - fine.min()
    return (fine / max(float(fine.max()), 1e-8)).astype(np.float32)


def content_shuffle(image: np.ndarray, seed: int = 0, cell: int = 256) -> np.ndarray:
    """HxWx3 uint8 -> HxWx3 uint8 shuffled image; the same seed gives the same result."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    map_x = smooth_noise(h, w, cell, rng) * float(w - 1)
    map_y = smooth_noise(h, w, cell, rng) * float(h - 1)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR)


ENTRIES = (
    Annotator(
        name="shuffle",
        description="content shuffle: random smooth flow remap (v1.1 shuffle model)",
        fn=content_shuffle,
        params=(
            Param("seed", ParamType.INT, 0, "random seed (same seed, same shuffle)", 0, 2**32 - 1),
            Param("cell", ParamType.INT, 256, "smoothness of the flow (pixels per noise cell)", 8, 4096),
        ),
    ),
)
