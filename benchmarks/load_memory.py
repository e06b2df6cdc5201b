"""Peak resident memory of loading a real-size ControlNet v1.0 file, as a multiple of its size.

Writes a file with every key and shape of the released SD1.5 (or SD2.1) v1.0 checkpoint (random
weights; 5.7 GB in float32), then, in a fresh process per file, loads its ControlNet and its base
model the way the app does (architecture inferred from shapes, no config), touches every weight
and reports the resident set's peak. The issue's bar: no more than ~1.3x the file.

    .venv/bin/python benchmarks/load_memory.py                    # SD1.5, fp32, .ckpt and .safetensors
    .venv/bin/python benchmarks/load_memory.py --table tests/data/sd21_controlldm_keys.json --dtype float16

Needs Linux (/proc/self/status) and about 2x the file in free disk and memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Loads both parts of each v1.0 file given, touches every weight, and prints the resident set
#: before and its peak after (bytes). The peak is the process's own high-water mark, reset once
#: the imports are done (ru_maxrss would carry a parent's peak over fork and exec).
PROBE = r"""
import gc, json, os, re, sys, time
import torch
from controlnet import Family
from controlnet.families.sd.controlnet import ControlNetConfig
from controlnet.formats import BaseConfig, load_base, load_controlnet
from controlnet.text.tokenizer import clip_tokenizer

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

clip_tokenizer(Family.SD1)  # the tokenizer's vocabulary is not part of the file: build it first
for path, arch in json.loads(sys.argv[1]):
    kw_cn, kw_base = {}, {}
    if arch:
        kw_cn = {"unet_config": arch["unet"], "config": ControlNetConfig.from_dict(arch["controlnet"])}
        kw_base = {"config": BaseConfig.from_dict(arch["base"])}
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident set
    before = status("VmRSS")
    t0 = time.perf_counter()
    models = [load_controlnet(path, **kw_cn), *load_base(path, **kw_base).modules().values()]
    seconds = time.perf_counter() - t0
    loaded = status("VmHWM")
    with torch.no_grad():
        total = sum(float(p.sum()) for m in models for p in m.parameters())
    out = {"path": path, "file_size": os.path.getsize(path), "before": before, "loaded": loaded,
           "touched": status("VmHWM"), "seconds": seconds}
    print(json.dumps(out))
    del models
"""


def probe(files: list[tuple[str, dict | None]]) -> list[dict]:
    """Run PROBE in a fresh interpreter over ``files`` ((path, architecture or None) pairs)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(files)], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return [json.loads(line) for line in done.stdout.strip().splitlines()]


#: Writes the file in a child process, so the writer's copy is gone before the probe runs.
WRITER = r"""
import json, sys
import torch
from safetensors.torch import save_file

table, out, dtype, kind = sys.argv[1:5]
dtype = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
tensors = {}
for key, shape in json.loads(open(table).read()).items():
    if key.endswith("position_ids"):
        tensors[key] = torch.arange(shape[-1]).expand(shape).contiguous()
    elif key == "betas":  # the only schedule buffer the loader reads
        tensors[key] = torch.linspace(0.00085**0.5, 0.012**0.5, shape[0]) ** 2
    else:
        tensors[key] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
if kind == "safetensors":
    save_file(tensors, out)
else:
    torch.save({"state_dict": tensors}, out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(ROOT / "tests/data/sd15_controlldm_keys.json"))
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--kinds", default="ckpt,safetensors", help="comma-separated: ckpt, safetensors")
    ap.add_argument("--dir", help="where to write the files (default: a temporary folder, removed after)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = []
        for kind in args.kinds.split(","):
            path = Path(tmp) / f"control_v10_{Path(args.table).stem}.{kind}"
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", WRITER, args.table, str(path), args.dtype, kind], check=True
            )
            print(
                f"wrote {path.name}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s"
            )
            files.append((str(path), None))
        rows = probe(files)
    print()
    print(f"{'file':<44} {'size GB':>8} {'load s':>7} {'peak after load':>16} {'peak, all touched':>18}")
    for r in rows:
        size = r["file_size"]
        print(
            f"{Path(r['path']).name:<44} {size / 1e9:>8.2f} {r['seconds']:>7.1f} "
            f"{(r['loaded'] - r['before']) / size:>15.2f}x {(r['touched'] - r['before']) / size:>17.2f}x"
        )
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
