"""``controlnet demo``: the model working end to end on CPU, in well under a minute.

Until the bundled trained model exists this demo runs on a FRESHLY INITIALISED tiny model (random
weights, SD1.x block structure) and shows the two facts the method rests on:
  1. zero-init identity: the controlled UNet's output equals the locked UNet's bit for bit;
  2. a few training steps open the zero convolutions, the loss falls, and the locked weights stay
     bitwise unchanged.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw

from .control import ControlledUNet
from .controlnet import ControlNet, ControlNetConfig
from .families import Family, tiny_unet_config

HINT_SIZE = 128


def _circle_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(outline RGB in [0,1], filled disc in [-1,1]) of one random circle, HINT_SIZE px."""
    r = int(rng.integers(16, 40))
    cx, cy = (int(v) for v in rng.integers(r + 4, HINT_SIZE - r - 4, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    outline = Image.new("RGB", (HINT_SIZE, HINT_SIZE))
    ImageDraw.Draw(outline).ellipse(box, outline=(255, 255, 255), width=2)
    filled = Image.new("L", (HINT_SIZE, HINT_SIZE))
    ImageDraw.Draw(filled).ellipse(box, fill=255)
    return np.asarray(outline, np.float32) / 255.0, np.asarray(filled, np.float32) / 127.5 - 1.0


def _batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_circle_pair(rng) for _ in range(n)]
    cond = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
    disc = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    # Stand-in "latents": the filled disc at 1/8 resolution in every latent channel.
    latents = F.interpolate(disc, scale_factor=1 / 8, mode="area").repeat(1, 4, 1, 1)
    return cond, latents


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_demo(out_dir: str | Path = "outputs/demo", steps: int = 60, seed: int = 0) -> dict[str, float]:
    """Run the demo, print what it shows, write the condition image and the loss curve."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    print("controlnet demo: a FRESHLY INITIALISED tiny model (random weights, SD1.x block structure).")
    print("                 The bundled trained model is not in this build yet; this shows the method.")

    unet = UNet2DConditionModel(**tiny_unet_config(Family.SD1)).eval()
    controlnet = ControlNet.from_unet(unet, ControlNetConfig(hint_block_channels=(8, 16, 16, 32)))
    model = ControlledUNet(unet, controlnet)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_cn = sum(p.numel() for p in controlnet.parameters())
    print(
        f"UNet {n_unet:,} parameters (locked); ControlNet {n_cn:,} parameters (trainable), "
        f"{controlnet.num_residuals} residuals"
    )

    # 1. Zero-init identity.
    cond, latents = _batch(rng, 4)
    context = torch.randn(4, 8, unet.config.cross_attention_dim)
    t = torch.randint(0, 1000, (4,))
    with torch.no_grad():
        base = unet(latents, t, context).sample
        controlled = model(latents, t, context, cond)
    identical = torch.equal(base, controlled)
    print(
        f"[1] zero-init identity: controlled == base bit for bit: {identical} "
        f"(max |diff| = {(base - controlled).abs().max().item():.1e})"
    )

    # 2. A few training steps of the diffusion loss, ControlNet only.
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    locked_before = _digest(unet)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        cond, latents = _batch(rng, 8)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (8,))
        noisy = sched.add_noise(latents, noise, t)
        loss = F.mse_loss(model(noisy, t, torch.zeros(8, 8, unet.config.cross_attention_dim), cond), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 6) == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"    step {step + 1:4d}/{steps}  loss {loss.item():.4f}  {rate:.1f} it/s")
    zero_norm = sum(float(z.weight.detach().norm()) for z in controlnet.zero_convs())
    k = max(1, steps // 5)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(
        f"[2] {steps} steps: loss {first:.4f} -> {last:.4f}; zero-conv weight norm 0 -> {zero_norm:.4f}; "
        f"locked UNet unchanged: {_digest(unet) == locked_before}"
    )

    Image.fromarray((cond[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(out / "condition.png")
    _plot_curve(losses, out / "loss.png")
    print(f"wrote {out / 'condition.png'} and {out / 'loss.png'}")
    return {"identical": float(identical), "loss_first": first, "loss_last": last, "zero_norm": zero_norm}


def _plot_curve(values: list[float], path: Path, size: tuple[int, int] = (480, 240)) -> None:
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = [
        (20 + i * (w - 40) / max(1, len(values) - 1), h - 20 - (v - lo) / span * (h - 40))
        for i, v in enumerate(values)
    ]
    draw.line(pts, fill=(30, 90, 200), width=2)
    draw.text((24, 4), f"training loss {hi:.3f} .. {lo:.3f}", fill="black")
    img.save(path)
