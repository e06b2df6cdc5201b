"""Loading holds no second copy: peak resident memory of loading a v1.0-layout file (ControlNet and
base model, every weight touched) stays under 1.3x the file. The real-size measurement (5.7 GB)
is benchmarks/load_memory.py; this runs its probe on a ~200 MB file, in a fresh process."""

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from controlnet import ControlNet, Family
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import tiny_unet_config
from controlnet.formats import BaseConfig, Format, save_controlnet
from controlnet.formats.original import base_tensors, controlnet_tensors
from controlnet.text.tokenizer import clip_tokenizer
from tiny import make_text_encoder, make_vae, released_file

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "benchmarks" / "load_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read memory peaks"
)
def test_loading_a_v10_file_holds_no_second_copy(tmp_path):
    cfg = tiny_unet_config(Family.SD1, cross_attention_dim=16)
    cfg.update(block_out_channels=[64, 128, 256, 256], norm_num_groups=16, attention_head_dim=4)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    base = UNetBase(Family.SD1, unet, make_vae(), make_text_encoder(), clip_tokenizer(Family.SD1))
    cn = ControlNet.from_unet(unet)
    files = {
        "safetensors": save_controlnet(cn, tmp_path / "v10.safetensors", Format.ORIGINAL, base=base)[0],
        "ckpt": released_file(
            tmp_path / "v10.ckpt", {**base_tensors(base), **controlnet_tensors(cn)}, "ckpt"
        ),
    }
    arch = {"unet": cn.unet_config, "controlnet": cn.config.to_dict(), "base": BaseConfig.of(base).to_dict()}
    del base, cn, unet
    runs = load_benchmark().probe([(str(files["ckpt"]), arch), (str(files["safetensors"]), None)])
    for kind, rss in zip(["ckpt", "safetensors"], runs):
        size = rss["file_size"]
        assert size > 150e6
        ratio = (rss["touched"] - rss["before"]) / size
        assert ratio <= 1.3, f"{kind}: loading took {ratio:.2f}x the file"
