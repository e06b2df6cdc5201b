"""Shared pieces of the GPU benchmarks: SD1.5-shaped models with random weights, timing, peaks.

Random weights of the real shapes do the real arithmetic and move the real bytes, so the timings
are those of the released models. Zero-initialised layers get small random values so that nothing
is timed on zeros.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from controlnet import ControlNet, ControlNetConfig, Family, unet_config
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import tiny_unet_config
from controlnet.text.tokenizer import clip_tokenizer

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def open_zero(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero parameter small random values (nothing is timed on zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p))


#: --smoke: tiny shapes on the CPU, to check a benchmark script end to end without a GPU
SMOKE = {
    "unet": {**tiny_unet_config(Family.SD1, cross_attention_dim=768), "sample_size": 64},
    "vae": {**SD_VAE, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
}


def sd15(
    device: str, dtype: torch.dtype, n_controlnets: int = 1, seed: int = 0, smoke: bool = False
) -> tuple[UNetBase, list[ControlNet]]:
    """An SD1.5-shaped base model (a 1-layer text encoder: prompts are pre-encoded in timings) and
    ControlNets copied from its UNet, random weights, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SMOKE["unet"] if smoke else unet_config(Family.SD1)))
        vae = AutoencoderKL(**(SMOKE["vae"] if smoke else SD_VAE))
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                num_hidden_layers=1,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=77,
            )
        )
    cns = []
    for i in range(n_controlnets):
        cn = ControlNet.from_unet(
            unet, ControlNetConfig(hint_block_channels=(4, 8, 8, 16)) if smoke else None
        )
        open_zero(cn, seed + 1 + i)
        cns.append(cn.to(dtype).eval())
    base = UNetBase(Family.SD1, unet, vae, text, clip_tokenizer(Family.SD1)).to(device, dtype)
    return base, cns


def diffusers_controlnet(unet: UNet2DConditionModel, cn: ControlNet) -> torch.nn.Module:
    """Diffusers' ``ControlNetModel`` holding ``cn``'s weights (our state-dict keys are its keys: a
    strict load), on ``cn``'s device and dtype, for the peer's pipelines."""
    from diffusers import ControlNetModel

    theirs = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=cn.config.hint_block_channels
    )
    theirs.load_state_dict(cn.state_dict())
    return theirs.to(cn.device, cn.dtype).eval()


def cuda_time(fn: Callable[[], Any], warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of ``fn`` in seconds, synchronising the GPU around each run."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate on random data (the ceiling to compare achieved rates with)."""
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    s = cuda_time(lambda: a @ b, warmup=3, reps=10)
    return 2 * n**3 / s / 1e12


def environment() -> dict[str, Any]:
    import diffusers

    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.split("\n")[0]
            .strip()
        )  # one line per GPU: the first
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "driver": driver,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
