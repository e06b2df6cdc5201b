"""Qwen-Image base models on disk and on the command line: diffusers' pipeline folder (as the
pipeline writes it, Qwen2.5-VL under the hub's names or transformers' own) and our single file,
loaded offline key by key and round-tripping bitwise; diffusers and transformers read the folder
we write; `controlnet generate` runs a Qwen-Image base with a Qwen-Image ControlNet through the
family registry with the family's defaults, and its sidecar replays."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from controlnet.cli import main
from controlnet.families.qwenimage import QwenImageControlNetConfig
from controlnet.families.qwenimage.base import PROMPT_TEMPLATE, QWEN_SCHEDULE, QwenImageBase
from controlnet.formats import (
    CheckpointError,
    detect,
    inspect_checkpoint,
    load_base,
    save_base,
    save_controlnet,
)
from test_qwenimage_generate import qwen_base

PROMPT = "a red disk on grey"


@pytest.fixture(scope="module")
def base() -> QwenImageBase:
    return qwen_base()


def same_module(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), what


def same_base(a: QwenImageBase, b: QwenImageBase, where: object) -> None:
    assert a.modules().keys() == b.modules().keys()
    for name, module in a.modules().items():
        same_module(module, b.modules()[name], f"{where}: {name}")
    assert a.schedule == b.schedule
    text = PROMPT_TEMPLATE.format(PROMPT)
    assert a.tokenizer(text).input_ids == b.tokenizer(text).input_ids, where
    assert a.tokenizer.pad_token_id == b.tokenizer.pad_token_id


def peer_pipeline(base: QwenImageBase) -> QwenImagePipeline:
    return QwenImagePipeline(
        transformer=base.transformer,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULE),
    )


def test_ours_and_the_diffusers_folder_round_trip_bitwise(base, tmp_path):
    ours = save_base(base, tmp_path / "qwen.safetensors")[0]
    d = detect(ours)
    assert (d.family, d.kinds, d.layout) == ("qwenimage", ("base",), "Qwen-Image base model")
    same_base(base, load_base(ours), ours)
    folder = save_base(load_base(ours), tmp_path / "folder", "diffusers")[0]
    assert detect(folder).layout == "QwenImagePipeline folder"
    same_base(base, load_base(folder), folder)
    again = save_base(load_base(folder), tmp_path / "again.safetensors")[0]
    a, b = load_file(ours), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the text encoder is stored under the hub's names, as transformers writes it
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(
        folder / "text_encoder" / "model.safetensors"
    )
    # the peers read the folder we write, part by part
    same_module(QwenImageTransformer2DModel.from_pretrained(folder / "transformer"), base.transformer, "peer")
    same_module(AutoencoderKLQwenImage.from_pretrained(folder / "vae"), base.vae, "peer vae")
    peer_text = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder")
    same_module(peer_text, base.text_encoder, "peer text encoder")
    info = inspect_checkpoint(ours)
    assert info.family == "Qwen-Image" and not info.refused
    assert info.parameters == {
        name: sum(t.numel() for t in module.state_dict().values()) for name, module in base.modules().items()
    }


def test_the_folder_diffusers_writes_loads_under_either_naming(base, tmp_path):
    peer_pipeline(base).save_pretrained(tmp_path / "peer")
    same_base(base, load_base(tmp_path / "peer"), "the pipeline's folder")
    # transformers' module names (model.language_model.*, model.visual.*) rather than the hub's
    weights = tmp_path / "peer" / "text_encoder" / "model.safetensors"
    state = {k: v.contiguous() for k, v in base.text_encoder.state_dict().items()}
    save_file(state, str(weights))
    assert any(k.startswith("model.language_model.") for k in state)
    same_base(base, load_base(tmp_path / "peer"), "transformers' names")


def test_a_broken_folder_is_refused_in_one_line(base, tmp_path):
    folder = save_base(base, tmp_path / "folder", "diffusers")[0]
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    del state["model.norm.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"text_encoder: missing keys \(1\): model\.norm\.weight"):
        load_base(folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match="lacks tokenizer/"):
        load_base(folder)


def test_generate_with_the_family_defaults_and_replay(base, tmp_path, capsys):
    folder = save_base(base, tmp_path / "qwen", "diffusers")[0]
    torch.manual_seed(3)
    cn = save_controlnet(
        base.new_controlnet(QwenImageControlNetConfig(num_layers=2)), tmp_path / "c.safetensors"
    )
    cond = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(cond)
    out = tmp_path / "out"
    argv = [
        "generate",
        "--base",
        str(folder),
        "--controlnet",
        str(cn[0]),
        "--image",
        str(cond),
        "--prompt",
        PROMPT,
    ]
    assert main([*argv, "--steps", "2", "--seed", "5", "--resolution", "64", "--out", str(out)]) == 0
    sidecar = next(out.glob("*.json"))
    record = json.loads(sidecar.read_text())["request"]
    assert (record["sampler"], record["guidance"], record["negative_prompt"]) == ("euler", 4.0, " ")
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # a ControlNet of another family on this base, and this family's on the default base: one line each
    from controlnet.bundled import BUNDLED_CONTROLNET, bundled_path

    other = [*argv[:3], "--controlnet", str(bundled_path(BUNDLED_CONTROLNET)), *argv[5:], "--out", str(out)]
    assert main(other) == 2
    assert "is not a Qwen-Image ControlNet" in capsys.readouterr().err
    assert main(["generate", "--controlnet", str(cn[0]), "--image", str(cond), "--out", str(out)]) == 2
    assert "not a ControlNet of a UNet" in capsys.readouterr().err
