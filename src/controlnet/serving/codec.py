"""Images as the HTTP APIs carry them: base64 text (plain or a data URL) in, base64 PNG out."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

__all__ = ["decode_image", "encode_png"]


def decode_image(data: str, what: str) -> bytes:
    """The bytes of a base64 image, plain or as a ``data:...;base64,`` URL."""
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"{what}: expected a base64-encoded image, got an empty value")
    text = data.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{what}: a data URL must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None


def encode_png(image: np.ndarray) -> str:
    """An (H, W[, C]) uint8 array -> base64 PNG text (RGBA stays RGBA)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
