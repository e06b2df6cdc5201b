"""Qwen-Image ControlNet files (issue 34): the published single file (InstantX's layout: the state
dict, no config), diffusers' folder and ours load offline, key by key, and convert among each
other bitwise; diffusers reads the folder we write, we read the one it writes; the architecture
of a file without a config comes from its tensors. Real sizes on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

from controlnet.errors import CheckpointError
from controlnet.families.qwenimage import QwenImageControlNet, QwenImageControlNetConfig
from controlnet.formats.api import detect, load_controlnet, save_controlnet
from controlnet.formats.tools import convert, inspect_checkpoint

#: sizes a file without a config can hold: Qwen-Image's 128-channel heads (one), its rotary split
CONFIG_LESS = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 128,
    "num_attention_heads": 1,
    "joint_attention_dim": 12,
    "axes_dims_rope": (16, 56, 56),
}


def opened(extra: int = 0) -> QwenImageControlNet:
    """A 2-block ControlNet with every layer random (its zero layers opened)."""
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**CONFIG_LESS).eval()
    cn = QwenImageControlNet.from_transformer(transformer, QwenImageControlNetConfig(2, extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in cn.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return cn


def same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("extra", [0, 4], ids=["union", "inpainting"])
def test_every_layout_loads_and_converts_bitwise(tmp_path, extra):
    cn = opened(extra)
    published = save_controlnet(cn, tmp_path / "published.safetensors", "original")[0]
    d = detect(published)
    assert (d.family, d.kinds) == ("qwenimage", ("controlnet",))
    assert d.layout == "Qwen-Image ControlNet, published layout (no config)"
    from_published = load_controlnet(published)
    same(from_published, cn)  # the architecture read off the tensors
    assert from_published.config == cn.config
    assert from_published.transformer_config == cn.transformer_config
    ours = convert(published, tmp_path / "ours.safetensors", "controlnet")[0]
    folder = convert(ours, tmp_path / "folder", "diffusers")[0]
    again = convert(folder, tmp_path / "again.safetensors", "original")[0]
    for path in (ours, folder, again):
        same(load_controlnet(path), cn)
    assert again.read_bytes() == published.read_bytes()
    said = inspect_checkpoint(published)
    assert said.controlnet["blocks"] == 2 and said.controlnet["inpainting"] == bool(extra)


def test_diffusers_reads_our_folder_and_we_read_its(tmp_path):
    cn = opened()
    folder = save_controlnet(cn, tmp_path / "ours", "diffusers")[0]
    peer = QwenImageControlNetModel.from_pretrained(folder, local_files_only=True)
    same(peer, cn)
    peer.save_pretrained(tmp_path / "theirs")
    same(load_controlnet(tmp_path / "theirs"), cn)


def test_a_published_file_of_other_heads_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    small = QwenImageTransformer2DModel(
        **{**CONFIG_LESS, "attention_head_dim": 8, "axes_dims_rope": (2, 2, 4)}
    )
    cn = QwenImageControlNet.from_transformer(small, QwenImageControlNetConfig(1))
    path = save_controlnet(cn, tmp_path / "small.safetensors", "original")[0]
    with pytest.raises(CheckpointError, match=r"small.safetensors: heads of 8 channels: .*diffusers folder"):
        load_controlnet(path)
    # its diffusers folder carries the config, so it loads
    same(load_controlnet(save_controlnet(cn, tmp_path / "small", "diffusers")[0]), cn)


def test_real_sizes_on_the_meta_device():
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel()  # diffusers 0.42's defaults: Qwen-Image's
    assert sum(p.numel() for p in transformer.parameters()) == 20_430_401_088
    cn = QwenImageControlNet(dict(transformer.config), QwenImageControlNetConfig(5), device="meta")
    assert sum(p.numel() for p in cn.parameters()) == 1_768_003_584
