"""The bundled ControlNet written as a Control-LoRA of the bundled base (exact factors: up = the
change of each copied layer's weight, down = the identity), loaded back on that base: its weights
and the images `controlnet generate` makes with it, against the bundled ControlNet itself, in
float32 and in a half precision.

    python benchmarks/control_lora_check.py --device cuda --dtype bfloat16 --out results/control-lora.json
    python benchmarks/control_lora_check.py --device cpu --dtype bfloat16   # minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_json

from controlnet.bundled import BUNDLED_BASE, BUNDLED_CONTROLNET, bundled_path
from controlnet.formats import load_base, load_controlnet
from controlnet.formats.control_lora import MARKER
from controlnet.formats.ldm import controlnet_rule


def write_control_lora(path: Path) -> int:
    """The bundled ControlNet as an exact Control-LoRA of the bundled base; the factored layers."""
    base = load_base(bundled_path(BUNDLED_BASE), dtype=torch.float32)
    cn = load_controlnet(bundled_path(BUNDLED_CONTROLNET), dtype=torch.float32)
    twins = base.unet.state_dict()
    hint_blocks = 2 * (len(cn.config.hint_block_channels) - 1)
    tensors, factored = {MARKER: torch.tensor([])}, 0
    for key, value in cn.state_dict().items():
        rule = controlnet_rule(key, dict(cn.unet_config), hint_blocks, "")
        if key in twins and key.endswith(".weight") and value.ndim in (2, 4):
            out, fan_in = value.shape[0], value[0].numel()
            change = value.reshape(out, fan_in) - twins[key].reshape(out, fan_in)
            layer = rule.file.removesuffix(".weight")
            tensors[layer + ".up"] = change.reshape(out, fan_in, *([1, 1] if value.ndim == 4 else []))
            tensors[layer + ".down"] = torch.eye(fan_in).reshape(fan_in, *value.shape[1:])
            factored += 1
        else:
            tensors[rule.file] = value.reshape(rule.file_shape(tuple(value.shape)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return factored


def weights(clora: Path, dtype: torch.dtype, device: str) -> dict[str, float]:
    base = load_base(bundled_path(BUNDLED_BASE)).to(device, dtype)
    whole = load_controlnet(bundled_path(BUNDLED_CONTROLNET), dtype=dtype).to(device).state_dict()
    built = load_controlnet(clora, base_unet=base.unet, dtype=dtype).state_dict()
    differ = sum(int((whole[k] != built[k]).sum()) for k in whole)
    return {
        "weights": sum(v.numel() for v in whole.values()),
        "weights_differing": differ,
        "max_abs_diff": max(float((whole[k].float() - built[k].float()).abs().max()) for k in whole),
    }


def images(controlnet: Path | None, cond: Path, dtype: str, device: str, out: Path) -> np.ndarray:
    cmd = [sys.executable, "-m", "controlnet.cli", "generate", "--image", str(cond)]
    cmd += ["--prompt", "gold circle with navy background", "--seed", "1", "--num-samples", "4"]
    cmd += ["--device", device, "--dtype", dtype, "--out", str(out), "--quiet"]
    cmd += ["--controlnet", str(controlnet)] if controlnet else []
    subprocess.run(cmd, check=True)
    record = json.loads(next(out.glob("*.json")).read_text())
    return np.stack(
        [np.asarray(Image.open(out / i["file"])).astype(int) for i in record["outputs"]["images"]]
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=("float16", "bfloat16"), default="bfloat16", help="the half precision to check"
    )
    p.add_argument("--out", default="results/control-lora.json")
    args = p.parse_args()
    res: dict = {"env": environment(), "command": " ".join(sys.argv), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        res["factored_layers"] = write_control_lora(d / "clora.safetensors")
        cond = Image.new("RGB", (128, 128))
        ImageDraw.Draw(cond).ellipse((30, 30, 98, 98), outline="white", width=3)
        cond.save(d / "cond.png")
        for dtype in ("float32", args.dtype):
            row = {
                "dtype": dtype,
                **weights(d / "clora.safetensors", getattr(torch, dtype), args.device),
            }
            whole = images(None, d / "cond.png", dtype, args.device, d / f"whole-{dtype}")
            built = images(d / "clora.safetensors", d / "cond.png", dtype, args.device, d / f"built-{dtype}")
            diff = np.abs(whole - built)
            row.update(images_identical=bool((diff == 0).all()), mean_level_diff=float(diff.mean()))
            row["max_level_diff"] = int(diff.max())
            res["rows"].append(row)
            print(row, flush=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
