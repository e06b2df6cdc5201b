"""Training data: named colours (more to come: the fill50k generator, data sets, caches).

- :mod:`.colors`: CSS named colours as fill50k prompts spell them; CIE Lab delta E; nearest names.
"""

from .colors import color_distance, color_name, color_names, delta_e, nearest_color, rgb, srgb_to_lab

__all__ = ["color_distance", "color_name", "color_names", "delta_e", "nearest_color", "rgb", "srgb_to_lab"]
