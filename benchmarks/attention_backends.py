"""Scaled-dot-product attention at SD1.5's shapes, one row per kernel PyTorch can use: which one
runs SD1.5's head size of 40 fastest, forward (generation) and forward + backward (training)?

Self-attention at the 64x64 latent (4096 tokens, 8 heads) and cross-attention to the 77 prompt
tokens, at the CFG batch of batch-8 generation (16) and at the training batch (8); head size 40
(SD1.5) and 64 for comparison. Each kernel's output is compared with the math kernel in float32.

    python benchmarks/attention_backends.py --out results/attention.json   # about a minute on an H100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_time, environment, table, write_json

#: (name, backend or None for PyTorch's own choice); "flex" is torch.compile'd flex_attention
BACKENDS: tuple[tuple[str, SDPBackend | None], ...] = (
    ("default", None),
    ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ("flash", SDPBackend.FLASH_ATTENTION),
    ("efficient", SDPBackend.EFFICIENT_ATTENTION),
)


def attention_fn(name: str) -> Callable[..., torch.Tensor]:
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False)
    backend = dict(BACKENDS)[name]
    if backend is None:
        return F.scaled_dot_product_attention

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def measure(name: str, b: int, h: int, n: int, m: int, d: int) -> dict[str, Any]:
    """Forward and forward+backward milliseconds of ``name`` for queries (b, h, n, d) against keys
    and values (b, h, m, d), and its largest difference from float32 math on the same inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, h, m, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv")
    row: dict[str, Any] = {"kernel": name, "shape": f"{b}x{h}x{n}x{m}", "head": d}
    try:
        fn = attention_fn(name)
        with torch.no_grad():
            out = fn(q, k, v)
            ref = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())
            row["max_abs_diff"] = float((out[:1].float() - ref).abs().max())
            fwd = cuda_time(lambda: fn(q, k, v), warmup=3, reps=20)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        both = cuda_time(lambda: fn(qg, kg, vg).sum().backward(), warmup=3, reps=10)
    except Exception as e:  # a kernel that refuses the shape is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    tflop = 4 * b * h * n * m * d / 1e12  # QK^T and PV, forward
    row.update(forward_ms=1e3 * fwd, forward_tflops=tflop / fwd, forward_backward_ms=1e3 * both)
    return row


def main() -> None:
    # flex_attention compiles for every shape and for each of forward-only and forward + backward:
    # more than dynamo's default of 8 compilations of one function, after which it runs unfused
    torch._dynamo.config.recompile_limit = 64
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/attention.json")
    args = p.parse_args()
    res: dict[str, Any] = {"env": environment(), "command": " ".join(sys.argv)}
    rows = []
    names = [n for n, _ in BACKENDS] + ["flex"]
    for b in (16, 8):
        for m in (4096, 77):
            for d in (40, 64):
                for name in names:
                    rows.append(measure(name, b, 8, 4096, m, d))
                    print(rows[-1], flush=True)
                    write_json(args.out, {**res, "rows": rows})
    cols = ["kernel", "shape", "head", "forward_ms", "forward_tflops", "forward_backward_ms", "max_abs_diff"]
    print(table(rows, [*cols, "error"]))


if __name__ == "__main__":
    main()
