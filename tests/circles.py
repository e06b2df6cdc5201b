"""A tiny in-memory control data set for training tests: circle outline -> filled circle."""

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset


class Circles(Dataset):
    def __init__(self, n: int = 16, size: int = 64, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        r = int(rng.integers(s // 8, s // 3))
        cx, cy = (int(v) for v in rng.integers(r, s - r, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        src, tgt = Image.new("RGB", (s, s)), Image.new("RGB", (s, s), (255, 255, 255))
        ImageDraw.Draw(src).ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=2)
        ImageDraw.Draw(tgt).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        t = torch.from_numpy(np.asarray(tgt, np.float32) / 127.5 - 1).permute(2, 0, 1)
        c = torch.from_numpy(np.asarray(src, np.float32) / 255).permute(2, 0, 1)
        return {"target": t, "cond": c, "prompt": f"circle {i % 3}", "index": i}
