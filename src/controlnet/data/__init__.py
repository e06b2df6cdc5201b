"""Training data: named colours and the fill50k generator (more to come: data sets, caches).

- :mod:`.colors`: CSS named colours as fill50k prompts spell them; CIE Lab delta E; nearest names.
- :mod:`.fill50k`: a deterministic generator of the fill50k world (circles, or several shapes).
"""

from .colors import color_distance, color_name, color_names, delta_e, nearest_color, rgb, srgb_to_lab
from .fill50k import Kind, Sample, Shape, generate, parse_prompt, read_samples, render_sample, shape_masks

__all__ = [
    "Kind",
    "Sample",
    "Shape",
    "color_distance",
    "color_name",
    "color_names",
    "delta_e",
    "generate",
    "nearest_color",
    "parse_prompt",
    "read_samples",
    "render_sample",
    "rgb",
    "shape_masks",
    "srgb_to_lab",
]
