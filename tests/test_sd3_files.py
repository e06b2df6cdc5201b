"""SD3 / SD3.5 models on disk and on the command line: ControlNets in the published single file,
diffusers' folder and ours, base models in diffusers' pipeline folder and ours, loaded offline key
by key and round-tripping bitwise; `controlnet generate` runs an SD3 base with an SD3 ControlNet
with the family's defaults, and its sidecar replays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, StableDiffusion3Pipeline
from PIL import Image

from controlnet.cli import main
from controlnet.families.sd3 import SD3ControlNet, SD3ControlNetConfig
from controlnet.families.sd3.base import SD3_SCHEDULE
from controlnet.formats import (
    Format,
    convert,
    detect,
    inspect_checkpoint,
    load_base,
    load_controlnet,
    save_base,
    save_controlnet,
)
from test_sd3_generate import TRANSFORMER, controlnet, sd3_base

#: heads of SD3's 64 channels (what a file without a config implies), one of them
FILE_SIZE = {"attention_head_dim": 64, "num_attention_heads": 1}


@pytest.fixture(scope="module")
def base():
    return sd3_base()


def same_cn(a: SD3ControlNet, b: SD3ControlNet) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "config",
    [
        SD3ControlNetConfig(num_layers=2),
        SD3ControlNetConfig(num_layers=2, extra_conditioning_channels=1),
        SD3ControlNetConfig(num_layers=2, own_pos_embed=False, reads_text=False, zero_pooled=False),
    ],
    ids=["instantx", "inpainting", "sd3.5-large"],
)
def test_controlnet_layouts_round_trip_bitwise(tmp_path, config):
    torch.manual_seed(0)
    cn = SD3ControlNet({**TRANSFORMER, **FILE_SIZE}, config)
    ours = save_controlnet(cn, tmp_path / "cn.safetensors")[0]
    assert detect(ours).family == "sd3"
    published = convert(ours, tmp_path / "published.safetensors", "original")[0]
    assert "published layout" in detect(published).layout
    folder = convert(published, tmp_path / "folder", "diffusers")[0]
    back = convert(folder, tmp_path / "back.safetensors", "controlnet")[0]
    for path in (ours, published, folder, back):
        got = load_controlnet(path)
        same_cn(cn, got)
        assert {
            k: v for k, v in got.transformer_config.items() if k in ("in_channels", "num_attention_heads")
        } == {
            "in_channels": 4,
            "num_attention_heads": 1,
        }
    peer = SD3ControlNetModel.from_pretrained(folder)  # diffusers reads ours
    assert peer.config.num_layers == 2 and peer.config.force_zeros_for_pooled_projection == config.zero_pooled
    info = inspect_checkpoint(published)
    assert info.family == "SD3" and info.controlnet["blocks"] == 2 and not info.refused


def test_base_folders_and_ours_round_trip(base, tmp_path):
    pipe = StableDiffusion3Pipeline(
        transformer=base.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        text_encoder_3=base.text_encoder_3,
        tokenizer_3=base.tokenizer_3,
    )
    pipe.save_pretrained(tmp_path / "hub")
    assert detect(tmp_path / "hub").family == "sd3"
    loaded = load_base(tmp_path / "hub")
    ours = save_base(loaded, tmp_path / "sd3.safetensors")[0]
    folder = save_base(load_base(ours), tmp_path / "again", "diffusers")[0]
    for path in (tmp_path / "hub", ours, folder):
        got = load_base(path)
        for name, module in base.modules().items():
            sa, sb = module.state_dict(), got.modules()[name].state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (path, name)
    assert StableDiffusion3Pipeline.from_pretrained(folder).transformer.config.num_layers == 4
    with pytest.raises(ValueError, match=r"written as 'controlnet' \(ours\) or 'diffusers' so far"):
        save_base(base, tmp_path / "x.safetensors", Format.ORIGINAL)


def test_generate_with_the_family_defaults_and_replay(base, tmp_path, capsys):
    folder = save_base(base, tmp_path / "sd3", "diffusers")[0]
    cn = save_controlnet(
        controlnet(base, SD3ControlNetConfig(num_layers=2), seed=2), tmp_path / "c.safetensors"
    )[0]
    cond = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(cond)
    out = tmp_path / "out"
    argv = [
        "generate",
        "--base",
        str(folder),
        "--controlnet",
        str(cn),
        "--image",
        str(cond),
        "--prompt",
        "a disk",
    ]
    assert main([*argv, "--steps", "2", "--seed", "5", "--resolution", "64", "--out", str(out)]) == 0
    sidecar = next(out.glob("*.json"))
    record = json.loads(sidecar.read_text())["request"]
    assert record["sampler"] == "euler" and record["guidance"] == 7.0 and record["negative_prompt"] == ""
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # an SD3 ControlNet on a Flux or SD base, and the other way round: one line each
    from controlnet.bundled import BUNDLED_CONTROLNET, bundled_path

    assert (
        main([*argv[:3], "--controlnet", str(bundled_path(BUNDLED_CONTROLNET)), *argv[5:], "--out", str(out)])
        == 2
    )
    assert "is not an SD3 ControlNet" in capsys.readouterr().err
    assert main(["generate", "--controlnet", str(cn), "--image", str(cond), "--out", str(out)]) == 2
    assert "not a ControlNet of a UNet" in capsys.readouterr().err
