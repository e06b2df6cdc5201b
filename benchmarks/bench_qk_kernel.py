"""The query/key kernel (RMS norm + rotary embedding + joined streams, tokens-major output) at the
families' real shapes: the hand-written Triton kernel (`controlnet.model.qk_kernel`) against the
same arithmetic as one torch.compile group (what ran before it), each timed alone with CUDA events
over many calls, its memory bandwidth (one read and one write of every element, the ideal), and
how far the two outputs are apart in bf16 units of the last place.

    python benchmarks/bench_qk_kernel.py --out results/qk-kernel.json   # a minute on an H100

Generation takes the kernel where it applies (``qk_kernel.ENABLED``); the generation benchmarks'
``--no-qk-kernel`` runs them with the compiled group instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, table, write_json

from controlnet.model import fused, qk_kernel

#: name: (batch, tokens of each stream, heads, head size, rotary)
SHAPES = {
    "Qwen-Image 1328 px (text 220, image 6889; one guidance half)": (1, (220, 6889), 24, 128, True),
    "Flux.1 1024 px double block (text 512, image 4096)": (1, (512, 4096), 24, 128, True),
    "Flux.1 1024 px single block (one joined stream)": (1, (4608,), 24, 128, True),
    "SD3.5 1024 px (no rotary)": (2, (4096, 333), 24, 64, False),
}


def events(fn, reps: int = 50) -> float:
    """Mean seconds of one call, by CUDA events over ``reps`` calls (after warm-up)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, (b, lengths, h, d, rotate) in SHAPES.items():
            parts = tuple(
                torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16).unflatten(-1, (h, d))
                for n in lengths
            )
            weights = tuple(1 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16) for _ in lengths)
            total = sum(lengths)
            angles = torch.rand(total, d // 2, device="cuda") * 6.28
            cos, sin = (f(angles).repeat_interleave(2, -1) for f in (torch.cos, torch.sin))
            tables = (cos, sin) if rotate else (None, None)
            ours = qk_kernel.qk_rms_rotary(parts, weights, 1e-6, *tables)
            group = fused._queries(parts, weights, 1e-6, *tables)
            ulp = (ours.float() - group.float()).abs() / group.float().abs().clamp_min(1e-30) * 2**7
            call = (parts, weights, 1e-6, *tables)
            t_ours = events(lambda call=call: qk_kernel.qk_rms_rotary(*call))
            t_group = events(lambda call=call: fused._queries(*call))
            moved = 2 * ours.numel() * ours.element_size()
            rows.append(
                {
                    "shape": name,
                    "kernel us": round(t_ours * 1e6, 1),
                    "compiled group us": round(t_group * 1e6, 1),
                    "speed-up": round(t_group / t_ours, 2),
                    "kernel GB/s": round(moved / t_ours / 1e9),
                    "group GB/s": round(moved / t_group / 1e9),
                    "max |diff| (bf16 ulp)": round(float(ulp.max()), 2),
                    "outputs differing": round(float((ours != group).float().mean()), 4),
                }
            )
            print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    write_json(args.out, {"environment": environment(), "kernel state": fused.kernel_state(), "rows": rows})


if __name__ == "__main__":
    main()
