"""Loading holds no second copy: peak resident memory of loading a v1.0-layout file (ControlNet and
base model, every weight touched) stays under 1.3x the file. The real-size measurement (5.7 GB)
is benchmarks/load_memory.py; this is the same probe at ~200 MB, in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from controlnet import ControlNet, Family
from controlnet.families import tiny_unet_config
from controlnet.formats import BaseConfig, Format, save_controlnet
from controlnet.formats.original import base_tensors, controlnet_tensors
from controlnet.models import BaseModel
from controlnet.tokenizer import clip_tokenizer
from tiny import make_text_encoder, make_vae, released_file

#: Loads both parts of each v1.0 file given, touches every weight, and prints the resident set
#: before and its peak after (bytes). The peak is the process's own high-water mark, reset once the
#: imports are done (ru_maxrss would carry the parent's peak over fork and exec).
PROBE = r"""
import gc, json, re, sys
import torch
from controlnet import Family
from controlnet.controlnet import ControlNetConfig
from controlnet.formats import BaseConfig, load_base, load_controlnet
from controlnet.tokenizer import clip_tokenizer

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
    models = [load_controlnet(path, **kw_cn), *load_base(path, **kw_base).modules().values()]
    loaded = status("VmHWM")
    with torch.no_grad():
        total = sum(float(p.sum()) for m in models for p in m.parameters())
    print(json.dumps({"path": path, "before": before, "loaded": loaded, "touched": status("VmHWM")}))
    del models
"""


def probe(files: list) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(files)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()]


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read memory peaks"
)
def test_loading_a_v10_file_holds_no_second_copy(tmp_path):
    cfg = tiny_unet_config(Family.SD1, cross_attention_dim=16)
    cfg.update(block_out_channels=[64, 128, 256, 256], norm_num_groups=16, attention_head_dim=4)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    base = BaseModel(Family.SD1, unet, make_vae(), make_text_encoder(), clip_tokenizer(Family.SD1))
    cn = ControlNet.from_unet(unet)
    files = {
        "safetensors": save_controlnet(cn, tmp_path / "v10.safetensors", Format.ORIGINAL, base=base)[0],
        "ckpt": released_file(
            tmp_path / "v10.ckpt", {**base_tensors(base), **controlnet_tensors(cn)}, "ckpt"
        ),
    }
    arch = {"unet": cn.unet_config, "controlnet": cn.config.to_dict(), "base": BaseConfig.of(base).to_dict()}
    del base, cn, unet
    runs = probe([[str(files["ckpt"]), arch], [str(files["safetensors"]), None]])
    for kind, rss in zip(["ckpt", "safetensors"], runs):
        size = files[kind].stat().st_size
        assert size > 150e6
        ratio = (rss["touched"] - rss["before"]) / size
        assert ratio <= 1.3, f"{kind}: loading took {ratio:.2f}x the file"
