"""Uploads to the server: every uploaded image is checked like a file (not an image, corrupt
data, decompression bombs: :mod:`controlnet.imageio`) and against the upload limits, then stored
once as a normalised PNG named by its pixels, which the requests then name."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..imageio import MAX_PIXELS, read_image, read_mask, save_png
from .limits import Limits

__all__ = ["UploadTooLarge", "Uploads", "megapixels"]


class UploadTooLarge(ValueError):
    """An upload over a size limit (HTTP 413)."""


def megapixels(h: int, w: int) -> float:
    return h * w / 1e6


class Uploads:
    """The checked, stored uploads of one server: PNGs in ``upload_dir``; ``incoming_dir`` holds
    an upload's bytes while they are checked."""

    def __init__(self, limits: Limits, upload_dir: Path, incoming_dir: Path) -> None:
        self.limits, self.upload_dir, self.incoming_dir = limits, upload_dir, incoming_dir

    def store(self, source: bytes | str | Path | np.ndarray, what: str, *, mask: bool = False) -> str:
        """Check an uploaded image and store it as a PNG; return its path (the same pixels give the
        same file). ``source``: the file's bytes, a file path, or an (H, W[, C]) uint8 array.
        ``what`` names the input in messages. ``mask``: read it as a mask (white or opaque =
        regenerate) and store it as a grey image. Other images keep their alpha channel: readers
        composite it (photos) or honour it (inpainting condition maps).

        Raises UploadTooLarge over a size limit, ValueError for anything that is not a readable
        image. The messages name ``what`` and the limit, never a server path.
        """
        if isinstance(source, np.ndarray):
            return self._store_array(_as_uint8(source, what), what)
        limit_bytes = int(self.limits.max_upload_mb * 1e6)
        tmp = None
        if isinstance(source, bytes):
            if len(source) > limit_bytes:
                raise UploadTooLarge(
                    f"{what}: the file is {len(source) / 1e6:.1f} MB, over the limit of "
                    f"{self.limits.max_upload_mb:g} MB"
                )
            tmp = self.incoming_dir / uuid.uuid4().hex
            tmp.write_bytes(source)
            path = tmp
        else:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"{what}: no image was given")
            if path.stat().st_size > limit_bytes:
                raise UploadTooLarge(
                    f"{what}: the file is {path.stat().st_size / 1e6:.1f} MB, over the limit of "
                    f"{self.limits.max_upload_mb:g} MB"
                )
        try:
            self._check_pixels(path, what)
            try:
                array = read_mask(path) if mask else read_image(path, alpha=True)
            except ValueError as e:  # imageio's checks: not an image, corrupt, too many pixels
                reason = _strip(e, path).removeprefix("cannot read the upload as an image (").rstrip(")")
                raise ValueError(f"{what}: not a readable image ({reason})") from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if mask:
            array = (array * 255).round().astype(np.uint8)
        return self._store_array(array, what)

    def _check_pixels(self, path: Path, what: str) -> None:
        """The size from the header alone, before any pixels are decoded."""
        limit = self.limits.max_upload_megapixels
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            raise UploadTooLarge(
                f"{what}: the image has too many pixels (limit {limit:g} megapixels)"
            ) from None
        except Exception as e:  # PIL raises many kinds for data that is not an image
            raise ValueError(f"{what}: not an image ({type(e).__name__}: {_strip(e, path)})") from None
        if megapixels(h, w) > limit or w * h > MAX_PIXELS:
            raise UploadTooLarge(
                f"{what}: the image is {w}x{h} ({megapixels(h, w):.1f} megapixels), over the limit of "
                f"{limit:g} megapixels"
            )

    def _store_array(self, array: np.ndarray, what: str) -> str:
        h, w = array.shape[:2]
        if megapixels(h, w) > self.limits.max_upload_megapixels:
            raise UploadTooLarge(
                f"{what}: the image is {w}x{h} ({megapixels(h, w):.1f} megapixels), over the limit of "
                f"{self.limits.max_upload_megapixels:g} megapixels"
            )
        digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode() + array.tobytes()).hexdigest()
        path = self.upload_dir / f"{digest[:24]}.png"
        if not path.exists():
            save_png(array, path)
        return str(path)


def _strip(error: BaseException, path: Path) -> str:
    """An error's message without the server-side path it may quote."""
    return str(error).replace(str(path), "the upload").replace(path.name, "the upload")


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if array.dtype.kind == "f" and array.size and float(np.nanmax(array)) <= 1.0:
            array = array * 255.0
        array = np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or array.size == 0:
        raise ValueError(f"{what}: not an image (array of shape {array.shape})")
    return array
