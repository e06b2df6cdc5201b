"""Z-Image base models on disk and on the command line: diffusers' pipeline folder (as the
pipeline writes it) and our single file, loaded offline key by key and round-tripping bitwise, the
tokenizer's chat template kept; diffusers and transformers read the folder we write; `controlnet
generate` runs a Z-Image base with a Z-Image ControlNet through the family registry with the
family's defaults, and its sidecar replays; a ControlNet of another family, or a control type
for one that reads none, is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen3Model

from controlnet.cli import main
from controlnet.families.zimage import ZImageControlNetConfig
from controlnet.families.zimage.base import ZIMAGE_SCHEDULE, ZImageBase
from controlnet.formats import detect, inspect_checkpoint, load_base, save_base, save_controlnet
from test_zimage_generate import zimage_base

PROMPT = "a red disk on grey"


@pytest.fixture(scope="module")
def base() -> ZImageBase:
    return zimage_base()


def same_base(a: ZImageBase, b: ZImageBase, where: object) -> None:
    assert a.modules().keys() == b.modules().keys()
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (where, name)
    assert a.schedule == b.schedule
    assert b.tokenizer.chat_template == a.tokenizer.chat_template, where  # the chat template came along
    assert a._templated(PROMPT) == b._templated(PROMPT)
    assert a.tokenizer(a._templated(PROMPT)).input_ids == b.tokenizer(b._templated(PROMPT)).input_ids


def test_ours_and_the_diffusers_folder_round_trip_bitwise(base, tmp_path):
    ours = save_base(base, tmp_path / "z.safetensors")[0]
    assert (detect(ours).family, detect(ours).layout) == ("zimage", "Z-Image base model")
    same_base(base, load_base(ours), ours)
    folder = save_base(load_base(ours), tmp_path / "folder", "diffusers")[0]
    assert detect(folder).layout == "ZImagePipeline folder"
    same_base(base, load_base(folder), folder)
    again = save_base(load_base(folder), tmp_path / "again.safetensors")[0]
    a, b = load_file(ours), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the peers read the folder we write
    peer = ZImageTransformer2DModel.from_pretrained(folder / "transformer")
    assert all(torch.equal(v, base.transformer.state_dict()[k]) for k, v in peer.state_dict().items())
    text = Qwen3Model.from_pretrained(folder / "text_encoder")
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in text.state_dict().items())
    info = inspect_checkpoint(ours)
    assert info.family == "Z-Image" and not info.refused


def test_the_folder_diffusers_writes_loads(base, tmp_path):
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        transformer=base.transformer,
    )
    pipe.save_pretrained(tmp_path / "peer")
    same_base(base, load_base(tmp_path / "peer"), "the pipeline's folder")


def test_generate_with_the_family_defaults_and_replay(base, tmp_path, capsys):
    folder = save_base(base, tmp_path / "z", "diffusers")[0]
    torch.manual_seed(3)
    net = base.new_controlnet(ZImageControlNetConfig((0, 2), None, 4))
    cn = save_controlnet(net, tmp_path / "c.safetensors")[0]
    cond = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(cond)
    out = tmp_path / "out"
    argv = ["generate", "--base", str(folder), "--controlnet", str(cn), "--image", str(cond)]
    argv += ["--prompt", PROMPT]
    assert main([*argv, "--steps", "2", "--seed", "5", "--resolution", "64", "--out", str(out)]) == 0
    sidecar = next(out.glob("*.json"))
    record = json.loads(sidecar.read_text())["request"]
    assert (record["sampler"], record["guidance"], record["negative_prompt"]) == ("euler", 6.0, "")
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    from controlnet.bundled import BUNDLED_CONTROLNET, bundled_path

    other = [*argv[:3], "--controlnet", str(bundled_path(BUNDLED_CONTROLNET)), *argv[5:], "--out", str(out)]
    assert main(other) == 2
    assert "is not a Z-Image ControlNet" in capsys.readouterr().err
    # a control type for a ControlNet of one kind (Z-Image's Union ControlNets read no mode)
    assert main([*argv, "--control-type", "canny", "--out", str(out)]) == 2
    assert "not a Union ControlNet" in capsys.readouterr().err
