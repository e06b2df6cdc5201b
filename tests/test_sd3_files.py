"""SD3 / SD3.5 models on disk and on the command line: ControlNets in the published single file,
diffusers' folder and ours, base models in diffusers' pipeline folder and ours, loaded offline key
by key and round-tripping bitwise; `controlnet generate` runs an SD3 base with an SD3 ControlNet
with the family's defaults, and its sidecar replays."""

from __future__ import annotations

import json
import math

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


@pytest.mark.parametrize("with_t5", [True, False], ids=["with-t5", "no-t5"])
def test_stability_single_file_loads_and_round_trips_bitwise(tmp_path, with_t5):
    from safetensors.torch import load_file

    from controlnet.generation.sampling import Sampling, render

    base = sd3_base(with_t5, config_less=True)
    written = save_base(base, tmp_path / "sd3_tiny.safetensors", Format.ORIGINAL)
    path = written[0]
    assert [p.name for p in written] == ["sd3_tiny.safetensors", "tokenizer.json"][: 2 if with_t5 else 1]
    d = detect(path)
    assert d.family == "sd3" and d.format is Format.ORIGINAL and "Stability AI" in d.layout
    back = load_base(path)
    assert back.modules().keys() == base.modules().keys()
    for name, module in base.modules().items():
        sa, sb = module.state_dict(), back.modules()[name].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    (tmp_path / "again").mkdir()
    again = save_base(back, tmp_path / "again" / "sd3_tiny.safetensors", Format.ORIGINAL)[0]
    a, b = load_file(path), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and it computes the same images as the model it was written from (T5's window is a setting
    # of the run, not of the file: the tiny model's is short)
    back.max_sequence_length = base.max_sequence_length
    sampling = Sampling("euler", "default", 2, 4.5)
    args = (["a disk"], [""], [3], (32, 32), sampling)
    same = render(base, [], *args, progress=False).latents, render(back, [], *args, progress=False).latents
    assert torch.equal(*same)


def test_mmdit_layout_at_real_size():
    """SD3-medium on the meta device: each of its 2,028,328,000 parameters has a place in
    the reference layout, the fused qkv tensors have their published shapes, and the
    architecture reads back from the names and shapes."""
    import math
    from pathlib import Path

    from diffusers import SD3Transformer2DModel

    from controlnet.formats.checkpoint import TensorFile
    from controlnet.formats.keymap import to_file
    from controlnet.formats.sd3_single import MMDIT, mmdit_config, mmdit_rule
    from test_sd3_controlnet import SD3_MEDIUM

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD3_MEDIUM)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in to_file(state, [mmdit_rule(k, 1536, 23) for k in state]).items()}
    known = {
        MMDIT + "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
        MMDIT + "joint_blocks.23.context_block.adaLN_modulation.1.weight": (3072, 1536),
        MMDIT + "joint_blocks.0.context_block.adaLN_modulation.1.weight": (9216, 1536),
        MMDIT + "x_embedder.proj.weight": (1536, 16, 2, 2),
        MMDIT + "pos_embed": (1, 36864, 1536),
        MMDIT + "final_layer.linear.weight": (64, 1536),
    }
    assert {k: shapes.get(k) for k in known} == known
    # every parameter, and the position table (a buffer, stored in the file)
    assert sum(math.prod(s) for s in shapes.values()) == 2_028_328_000 + 36864 * 1536
    tf = TensorFile(
        Path("sd3_medium.safetensors"), shapes, {k: torch.float16 for k in shapes}, lambda k: None
    )
    config = mmdit_config(tf)
    with torch.device("meta"):
        rebuilt = SD3Transformer2DModel(**config)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }


def test_stability_files_apart_in_a_folder(tmp_path):
    """SD3.5's single files hold the MMDiT and the VAE; the text encoders come apart (as ComfyUI
    keeps them): a folder of them loads as one model, each file recognised by its keys."""
    from safetensors.torch import load_file, save_file

    from controlnet.formats.sd3_single import TEXT

    base = sd3_base(True, config_less=True)
    (tmp_path / "whole").mkdir()
    path = save_base(base, tmp_path / "whole" / "sd3.5_tiny.safetensors", Format.ORIGINAL)[0]
    tensors = load_file(path)
    folder = tmp_path / "comfy"
    folder.mkdir()
    names = {
        "text_encoder": "clip_l.safetensors",
        "text_encoder_2": "clip_g.safetensors",
        "text_encoder_3": "t5xxl_fp16.safetensors",
    }
    for part, prefix in TEXT.items():
        part_tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        save_file(part_tensors, str(folder / names[part]))
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("text_encoders.")},
        str(folder / "sd3.5_tiny.safetensors"),
    )
    (folder / "tokenizer.json").write_text((tmp_path / "whole" / "tokenizer.json").read_text())
    d = detect(folder)
    assert d.family == "sd3" and "Stability AI" in d.layout
    back = load_base(folder)
    for name, module in base.modules().items():
        sa, sb = module.state_dict(), back.modules()[name].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    (folder / "clip_g.safetensors").unlink()
    with pytest.raises(Exception, match=r"needs its text_encoder_2 in it or beside it"):
        load_base(folder)


def test_inspect_names_the_parts_of_every_layout(tmp_path):
    base = sd3_base(True, config_less=True)
    (tmp_path / "s").mkdir()
    single = save_base(base, tmp_path / "s" / "sd3.safetensors", Format.ORIGINAL)[0]
    info = inspect_checkpoint(single)
    assert info.family == "SD3 / SD3.5" and not info.refused
    assert set(info.parameters) == {"transformer", "vae", "clip_l", "clip_g", "t5xxl"}
    assert info.parameters["transformer"] == sum(
        p.numel() for p in base.transformer.parameters()
    ) + math.prod(base.transformer.pos_embed.pos_embed.shape)
    folder = save_base(base, tmp_path / "d", "diffusers")[0]
    info = inspect_checkpoint(folder)
    assert "transformer/diffusion_pytorch_model.safetensors" in info.parameters and info.loads == {
        "base": None
    }
