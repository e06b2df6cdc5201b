"""Z-Image ControlNets on disk: the published single file (no config: width, heads, condition
channels and the refiner form read off the tensors, the places of the published block counts),
diffusers' folder and ours, loaded offline key by key and converted bitwise among the three;
diffusers reads the folder we write; a count of blocks no published ControlNet has is refused in
one line that names the file and what to give instead."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

from controlnet.families.zimage import ZImageControlNet, ZImageControlNetConfig
from controlnet.formats import (
    CheckpointError,
    convert,
    detect,
    inspect_checkpoint,
    load_controlnet,
    save_controlnet,
)
from test_zimage_controlnet import TRANSFORMER

#: heads of 16 channels: the width 32 in 2 heads
CASES = {
    "union-2.1": ZImageControlNetConfig(tuple(range(0, 30, 2)), (0, 1), 33, "control_noise_refiner"),
    "union-2.0": ZImageControlNetConfig(tuple(range(0, 30, 2)), (0, 1), 33, "control_layers"),
    "union-1": ZImageControlNetConfig((0, 5, 10, 15, 20, 25), None, 16, None),
    "lite": ZImageControlNetConfig((0, 14, 28), (0, 1), 33, "control_noise_refiner"),
}


def made(config: ZImageControlNetConfig) -> ZImageControlNet:
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**{**TRANSFORMER, "n_layers": 30}).eval()
    cn = ZImageControlNet.from_transformer(transformer, config)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "_proj" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    return cn


def same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(CASES))
def test_every_layout_loads_and_converts_bitwise(tmp_path, name):
    cn = made(CASES[name])
    published = save_controlnet(cn, tmp_path / "published.safetensors", "original")[0]
    d = detect(published)
    assert (d.family, d.layout) == ("zimage", "Z-Image ControlNet, published layout (no config)")
    back = load_controlnet(published)
    same(back, cn)
    assert back.config == cn.config  # the places, refiner form and condition channels read back
    assert {k: back.transformer_config[k] for k in ("dim", "n_heads", "n_kv_heads")} == {
        "dim": 32,
        "n_heads": 2,
        "n_kv_heads": 2,
    }
    ours = convert(published, tmp_path / "ours.safetensors", "controlnet")[0]
    folder = convert(ours, tmp_path / "folder", "diffusers")[0]
    again = convert(folder, tmp_path / "again.safetensors", "original")[0]
    for path in (ours, folder, again):
        same(load_controlnet(path), cn)
    assert again.read_bytes() == published.read_bytes()
    peer = ZImageControlNetModel.from_pretrained(folder)  # diffusers reads ours
    assert list(peer.config.control_layers_places) == list(cn.config.control_layers_places)
    assert peer.config.add_control_noise_refiner == cn.config.refiner
    assert {k: v.shape for k, v in peer.state_dict().items()} == {
        k: v.shape for k, v in cn.state_dict().items()
    }
    info = inspect_checkpoint(published)
    assert info.family == "Z-Image" and info.controlnet["blocks"] == len(cn.config.control_layers_places)
    assert not info.refused


def test_a_block_count_no_published_controlnet_has_is_refused(tmp_path):
    cn = made(ZImageControlNetConfig((0, 7), None, 16))
    published = save_controlnet(cn, tmp_path / "odd.safetensors", "original")[0]
    with pytest.raises(
        CheckpointError, match=r"odd\.safetensors: 2 control blocks: .*give the ControlNet's diffusers"
    ):
        load_controlnet(published)
    folder = save_controlnet(cn, tmp_path / "odd", "diffusers")[0]  # its config.json names them
    same(load_controlnet(folder), cn)
