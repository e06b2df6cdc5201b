"""Training data: the fill50k generator, data set layouts, named colours, latent/embedding caches.

- :mod:`.colors`: CSS named colours as fill50k prompts spell them; CIE Lab delta E; nearest names.
- :mod:`.fill50k`: a deterministic generator of the fill50k world (circles, or several shapes).
- :mod:`.datasets`: ``open_dataset`` for prompt.json, metadata.jsonl/.csv and plain image folders.
- :mod:`.cache`: VAE posteriors and prompt embeddings computed once, for fast epochs.
"""

from .cache import CachedDataset, CacheMismatchError, base_digest, build_cache, sample_latents
from .colors import color_distance, color_name, color_names, delta_e, nearest_color, rgb, srgb_to_lab
from .datasets import ControlDataset, DatasetError, Layout, Skipped, open_dataset, resize_center_crop
from .fill50k import Kind, Sample, Shape, generate, parse_prompt, read_samples, render_sample, shape_masks

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
