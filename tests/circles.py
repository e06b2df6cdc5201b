"""A tiny in-memory control data set for training tests: circle outline -> filled circle."""

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset


class Circles(Dataset):
    def __init__(self, n: int = 16, size: int = 64, seed: int = 0, latents: bool = False) -> None:
        """``latents``: also give cached-style posterior moments (the target at 1/8 size in four
        channels, a small std), so the trainer skips the VAE as it does with a latent cache."""
        self.n, self.size, self.seed, self.latents = n, size, seed, latents

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
        item = {"target": t, "cond": c, "prompt": f"circle {i % 3}", "index": i}
        if self.latents:
            small = torch.nn.functional.avg_pool2d(t[None], 8)[0]
            item["latent_mean"] = torch.cat([small, small.mean(0, keepdim=True)])
            item["latent_std"] = torch.full_like(item["latent_mean"], 0.05)
        return item
