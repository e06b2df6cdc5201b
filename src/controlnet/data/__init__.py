"""Training data: the fill50k generator, data set layouts, named colours, latent/embedding caches.

- :mod:`.colors`: CSS named colours as fill50k prompts spell them; CIE Lab delta E; nearest names.
- :mod:`.fill50k`: a deterministic generator of the fill50k world (circles, or several shapes).
- :mod:`.outlines`: the outlines world: several closed shapes of six kinds (:mod:`.figures`) per
  image, each in its own colour; :mod:`.pairset` writes either world's files.
- :mod:`.datasets`: ``open_dataset`` for prompt.json, metadata.jsonl/.csv and plain image folders.
- :mod:`.cache`: VAE posteriors and prompt embeddings computed once, for fast epochs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(
        ["CachedDataset", "CacheMismatchError", "base_digest", "build_cache", "sample_latents"], "cache"
    ),
    **dict.fromkeys(
        ["color_distance", "color_name", "color_names", "delta_e", "nearest_color", "rgb", "srgb_to_lab"],
        "colors",
    ),
    **dict.fromkeys(
        ["ControlDataset", "DatasetError", "Layout", "Skipped", "open_dataset", "resize_center_crop"],
        "datasets",
    ),
    **dict.fromkeys(
        [
            "Kind",
            "Sample",
            "Shape",
            "generate",
            "parse_prompt",
            "read_samples",
            "render_sample",
            "shape_masks",
        ],
        "fill50k",
    ),
}


def __getattr__(name: str) -> Any:
    """Import on first use: generating data needs neither torch nor diffusers."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'controlnet.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CacheMismatchError",
    "CachedDataset",
    "ControlDataset",
    "DatasetError",
    "Kind",
    "Layout",
    "Sample",
    "Shape",
    "Skipped",
    "base_digest",
    "build_cache",
    "color_distance",
    "color_name",
    "color_names",
    "delta_e",
    "generate",
    "nearest_color",
    "open_dataset",
    "parse_prompt",
    "read_samples",
    "render_sample",
    "resize_center_crop",
    "rgb",
    "sample_latents",
    "shape_masks",
    "srgb_to_lab",
]
