"""Reading and writing images: clear errors on bad files, atomic writes, grids, file digests."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "atomic_write_bytes",
    "check_output_path",
    "encode_png_fast",
    "flatten_alpha",
    "give_default_mode",
    "list_images",
    "make_grid",
    "probe_image",
    "read_image",
    "read_mask",
    "save_png",
    "sha256_file",
    "to_uint8",
    "write_image",
]

#: Refuse images above this many pixels (a decompression bomb, or a mistake): 64 megapixels.
MAX_PIXELS = 64 * 1024 * 1024


#: file name endings read as images where a folder is given
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (hidden ones left out), in natural name order
    (``frame2`` before ``frame10``); an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    images = [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    ]
    if not images:
        raise ValueError(f"{folder}: no images in this folder (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return sorted(
        images, key=lambda p: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]
    )


def _open(path: str | Path, *, decode: bool = True) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(
                f"{path}: image is {img.width}x{img.height}, over the {MAX_PIXELS:,}-pixel limit"
            )
        if decode:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {path} as an image ({e})") from None
    return img


def probe_image(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header alone (no pixels decoded); the errors of
    :func:`read_image` for a missing file, one that is not an image, or one that is too large."""
    with _open(path, decode=False) as img:
        return img.height, img.width


def read_image(path: str | Path, *, alpha: bool = False) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB; grey images become three equal channels. Transparent
    pixels are composited over white, or with ``alpha`` a file with transparency is read as
    (H, W, 4) RGBA, its alpha kept (condition maps: alpha 0 marks pixels without a condition)."""
    img = _open(path)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8).copy()
        return rgba if alpha else flatten_alpha(rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def flatten_alpha(image: np.ndarray) -> np.ndarray:
    """An (H, W, 4) RGBA uint8 image composited over white, as (H, W, 3) RGB; other images as
    they are."""
    if image.ndim != 3 or image.shape[2] != 4:
        return image
    rgba = Image.fromarray(image, "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path) -> np.ndarray:
    """A mask image -> (H, W) float32 in [0, 1]; white (1) marks the region to regenerate. An
    alpha channel, when present, is the mask (opaque = regenerate)."""
    img = _open(path)
    if img.mode in ("RGBA", "LA"):
        return np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def give_default_mode(path: str | Path) -> None:
    """Give a file the mode a plain ``open()`` would (0666 less the umask): temporary files and
    safetensors' own writer create files readable by their owner only."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_path(path: str | Path) -> Path:
    """``path`` if Pillow can write its extension and its folder exists; an error otherwise."""
    path = Path(path)
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"cannot write {path}: unknown image extension {path.suffix!r} (use .png)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    return path


def write_image(path: str | Path, image: np.ndarray | Image.Image) -> Path:
    """Write an (H, W[, C]) uint8 array or a PIL image in the format of the extension, atomically;
    on any failure (e.g. an RGBA map to a format without alpha) nothing is left behind."""
    import io

    path = Path(path)
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"cannot write {path}: unknown image extension {path.suffix!r} (use .png)")
    fmt = Image.registered_extensions()[path.suffix.lower()]
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot write {path.name} as {fmt}: {e}") from None
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_png(image: np.ndarray | Image.Image, path: str | Path) -> Path:
    """Save as PNG, atomically (folders are created)."""
    return write_image(Path(path).with_suffix(".png") if Path(path).suffix == "" else path, image)


def encode_png_fast(image: np.ndarray, level: int = 1) -> bytes:
    """An (H, W, 3) or (H, W) uint8 array -> PNG bytes, with no row filters and zlib at ``level``.

    About ten times faster than PIL's encoder on flat synthetic images (fill50k writes 100,000 of
    them), and a pure function of the pixels and zlib: the same array gives the same bytes.
    """
    a = np.ascontiguousarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"encode_png_fast wants (H, W, 3) or (H, W) uint8, got {a.shape} {a.dtype}")
    h, w = a.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, -1)], axis=1)  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if a.ndim == 3 else 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Tile images (each (H, W, 3) uint8) into a grid, one list per row, white padding between.
    Images in a row may differ in size; each cell is as large as the largest image."""
    cells = [img for row in rows for img in row]
    if not cells:
        raise ValueError("make_grid needs at least one image")
    ch = max(i.shape[0] for i in cells)
    cw = max(i.shape[1] for i in cells)
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (ch + pad) + pad, ncols * (cw + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
            y, x = pad + r * (ch + pad), pad + c * (cw + pad)
            grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return grid


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, or of every file of a folder (sorted relative paths, then contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def to_uint8(x: torch.Tensor, lo: float = -1.0) -> np.ndarray:
    """(3, H, W) tensor in [lo, 1] (or already uint8) -> (H, W, 3) uint8."""
    import torch

    if x.dtype == torch.uint8:
        return x.permute(1, 2, 0).cpu().numpy()
    x = (x.detach().float().cpu().clamp(lo, 1) - lo) / (1 - lo)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
