"""Shared helpers of the web app and API tests: tiny model files, images as base64, a client."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from controlnet import Family
from controlnet.formats import save_base, save_controlnet
from tiny import make_base, make_controlnet


def model_files(folder: Path) -> tuple[str, list[str]]:
    """A tiny SD1 base and two ControlNets for it, saved in our format: (base, [cn_a, cn_b])."""
    base = make_base(Family.SD1)
    save_base(base, folder / "base.safetensors")
    cns = []
    for name, seed in (("edges", 1), ("second", 2)):
        save_controlnet(make_controlnet(base.unet, open_zero=True, seed=seed), folder / f"{name}.safetensors")
        cns.append(str(folder / f"{name}.safetensors"))
    return str(folder / "base.safetensors"), cns


def square(size: int = 64) -> np.ndarray:
    """A white square on black: a condition map, and a photo with clear edges."""
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return img


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes | np.ndarray) -> str:
    return base64.b64encode(png_bytes(data) if isinstance(data, np.ndarray) else data).decode()


def decode(text: str) -> np.ndarray:
    """A base64 PNG from the API -> array (RGBA kept)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def serve_tiny(folder: Path, limits):  # -> RunningServer
    """A server of the tiny model files (:func:`model_files`) under ``limits``; ``.files`` holds
    (base, [cn_a, cn_b])."""
    from controlnet.serving.server import start
    from controlnet.serving.service import ServeConfig

    base, cns = model_files(folder)
    srv = start(ServeConfig(base=base, controlnets=tuple(cns), limits=limits))
    srv.files = (base, cns)
    return srv


def hold_at_step(monkeypatch, step: int = 2):
    """Hold a running generation where it reports step ``step`` until released: returns the events
    (reached, release); set release when done."""
    import threading

    from controlnet.generation.watch import Watch

    original = Watch.stepped
    reached, release = threading.Event(), threading.Event()

    def stepped(self, done, estimate):
        if done == step and not release.is_set():
            reached.set()
            release.wait(60)
        return original(self, done, estimate)

    monkeypatch.setattr(Watch, "stepped", stepped)
    return reached, release
