"""Control-LoRA files (Stability AI's layout): a ControlNet stored as low-rank changes to the UNet
it is copied from, built on the base model it runs with."""

import pytest
import torch
from safetensors.torch import save_file

from controlnet import Family
from controlnet.cli import main
from controlnet.formats import (
    CheckpointError,
    Format,
    detect,
    inspect_checkpoint,
    load_controlnet,
    save_base,
)
from tiny import (
    TINY_HINT,
    assert_same_state,
    cond_image,
    control_lora_file,
    control_lora_tensors,
    make_base,
    make_unet,
    unet_inputs,
)

CONV = "input_blocks.1.0.in_layers.2"  # down_blocks.0.resnets.0.conv1, a 3x3 convolution
TO_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # a linear layer
NORM = "input_blocks.1.0.in_layers.0"  # down_blocks.0.resnets.0.norm1
TIME = "time_embed.0"  # time_embedding.linear_1


def save(path, tensors: dict):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def product(tensors: dict, layer: str) -> torch.Tensor:
    return tensors[layer + ".up"].flatten(1) @ tensors[layer + ".down"].flatten(1)


def test_weights_are_the_base_unets_plus_the_low_rank_changes(tmp_path):
    unet = make_unet(Family.SD1)
    tensors = control_lora_tensors(unet, whole=(f"{TIME}.weight",), left_out=(f"{NORM}.weight",))
    cn = load_controlnet(save(tmp_path / "c.safetensors", tensors), base_unet=unet)

    conv, to_q = (
        cn.down_blocks[0].resnets[0].conv1,
        cn.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
    )
    base_conv = unet.down_blocks[0].resnets[0].conv1
    base_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    want = base_conv.weight + product(tensors, CONV).reshape(base_conv.weight.shape)
    torch.testing.assert_close(conv.weight, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(to_q.weight, base_q.weight + product(tensors, TO_Q), rtol=0, atol=1e-6)
    assert torch.equal(conv.bias, tensors[f"{CONV}.bias"])  # given whole: the file's
    assert torch.equal(cn.time_embedding.linear_1.weight, tensors[f"{TIME}.weight"])
    # left out: the base UNet's own; the hint encoder and zero convs: the file's
    assert torch.equal(cn.down_blocks[0].resnets[0].norm1.weight, unet.down_blocks[0].resnets[0].norm1.weight)
    assert torch.equal(cn.down_blocks[0].resnets[0].norm1.bias, tensors[f"{NORM}.bias"])
    assert torch.equal(cn.controlnet_down_blocks[0].weight, tensors["zero_convs.0.0.weight"])
    assert torch.equal(cn.controlnet_cond_embedding.conv_in.weight, tensors["input_hint_block.0.weight"])
    assert cn.config.hint_block_channels == TINY_HINT.hint_block_channels

    before = {k: v.clone() for k, v in cn.state_dict().items()}
    with torch.no_grad():  # the ControlNet holds copies: changing the UNet leaves it as it was
        for p in unet.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in cn.state_dict().items())


def test_half_precision_sums_in_float32_and_rounds_once(tmp_path):
    unet = make_unet(Family.SD1)
    tensors = control_lora_tensors(unet)
    cn = load_controlnet(save(tmp_path / "c.safetensors", tensors), base_unet=unet, dtype=torch.bfloat16)
    base_conv = unet.down_blocks[0].resnets[0].conv1.weight
    want = (base_conv + product(tensors, CONV).reshape(base_conv.shape)).to(torch.bfloat16)
    assert torch.equal(cn.down_blocks[0].resnets[0].conv1.weight, want)
    assert {p.dtype for p in cn.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL], ids=lambda f: f.value)
def test_equals_diffusers_load_lora_adapter(tmp_path, family):
    """An independent reading of the layout: diffusers' ControlNetModel copied from the same UNet,
    with the file loaded by its ``load_lora_adapter``, computes the same residuals. The file gives
    the layers it changes by factors no bias of their own: diffusers keeps the base's biases there
    where ComfyUI, which the released files were made for, takes the file's (as we do; the first
    test)."""
    pytest.importorskip("peft")
    from diffusers import ControlNetModel

    unet = make_base(family).unet
    tensors = control_lora_tensors(unet, seed=3, factored_biases=False)
    ours = load_controlnet(save(tmp_path / "c.safetensors", tensors), base_unet=unet).eval()
    theirs = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=TINY_HINT.hint_block_channels
    )
    with pytest.warns(RuntimeWarning):  # peft notes the hint encoder's first conv is given whole
        theirs.load_lora_adapter(dict(tensors), prefix=None)
    theirs.eval()
    inputs = unet_inputs(unet)
    inputs["encoder_hidden_states"] = torch.randn(2, 5, unet.config.cross_attention_dim)
    cond = cond_image()
    with torch.no_grad():
        down, mid = theirs(**inputs, controlnet_cond=cond, return_dict=False)
        got = ours(**inputs, hint=ours.encode_hint(cond))
    assert len(got) == len(down) + 1
    for a, b in zip([*down, mid], got):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(f"{CONV}.up"), f"'{CONV}.down' has no '{CONV}.up' beside it"),
        (
            lambda t: t.pop("zero_convs.0.0.weight"),
            "missing tensors the base UNet has no twin of (1): zero_convs.0.0.weight",
        ),
        (
            lambda t: t.update({"input_blocks.99.0.op.weight": torch.zeros(1)}),
            "has no place for (1): input_blocks.99.0.op.weight",
        ),
        (
            lambda t: t.update({f"{CONV}.up": torch.zeros(3, 2, 1, 1)}),
            f"{CONV}: factors (2, 8, 3, 3) (down), (3, 2, 1, 1) (up) for a weight (8, 8, 3, 3)",
        ),
        (
            lambda t: t.update({f"{CONV}.weight": torch.zeros(8, 8, 3, 3)}),
            f"{CONV}: given both whole and as factors",
        ),
        (lambda t: t.update({f"{NORM}.bias": torch.zeros(5)}), f"{NORM}.bias: file (5,), model (8,)"),
        (lambda t: [t.pop(k) for k in list(t) if k.startswith("input_hint_block")], "without a hint encoder"),
    ],
    ids=["unpaired", "no zero conv", "stray key", "factor size", "twice", "whole size", "no hint encoder"],
)
def test_bad_files_are_refused_naming_the_file_and_key(tmp_path, change, message):
    unet = make_unet(Family.SD1)
    tensors = control_lora_tensors(unet)
    change(tensors)
    path = save(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        load_controlnet(path, base_unet=unet)
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_file_for_another_family_or_without_a_base_is_refused(tmp_path):
    """Told by the real sizes' cross-attention width (SDXL's 2048 with its added embedding), before
    any tensor is read: the base here is a real-size SD1.5 UNet on the meta device."""
    from diffusers import UNet2DConditionModel

    from controlnet.families.sd.configs import unet_config

    to_k = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    path = save(
        tmp_path / "xl.safetensors",
        {
            "lora_controlnet": torch.tensor([]),
            f"{to_k}.down": torch.zeros(2, 2048),
            f"{to_k}.up": torch.zeros(640, 2),
            "label_emb.0.0.weight": torch.zeros(1280, 2816),
        },
    )
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**unet_config(Family.SD1))
    with pytest.raises(CheckpointError, match=r"a Control-LoRA for SDXL, but the base model is SD1\.x"):
        load_controlnet(path, base_unet=sd15)
    assert inspect_checkpoint(path).family == "SDXL"
    with pytest.raises(CheckpointError, match="load it with the base model"):
        load_controlnet(path)


def test_detect_inspect_and_convert_to_a_whole_controlnet(tmp_path, capsys):
    base = make_base(Family.SD1)
    base_file = save_base(base, tmp_path / "base.safetensors")[0]
    path = control_lora_file(tmp_path / "c.safetensors", base.unet)
    d = detect(path)
    assert d.control_lora and d.format is Format.ORIGINAL and d.kinds == ("controlnet",)
    info = inspect_checkpoint(path)
    # (a tiny model's widths name no family)
    assert info.family == "unknown" and info.controlnet["hint_block_channels"] == [4, 8, 8, 16]
    assert "rank 2" in info.notes[0] and "load it with its base model" in info.notes[0]
    assert main(["inspect", str(path)]) == 0 and "(Control-LoRA: low-rank" in capsys.readouterr().out

    out = tmp_path / "whole.safetensors"
    assert main(["convert", str(path), str(out), "--to", "controlnet", "--base", str(base_file)]) == 0
    assert_same_state(load_controlnet(out), load_controlnet(path, base_unet=base.unet))
    assert main(["convert", str(path), str(tmp_path / "o.safetensors"), "--to", "controlnet"]) == 2
    assert "load it with the base model (convert: --base)" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                str(out),
                str(tmp_path / "o.safetensors"),
                "--to",
                "original",
                "--base",
                str(base_file),
            ]
        )
        == 2
    )
    assert "only a Control-LoRA is built on one" in capsys.readouterr().err
