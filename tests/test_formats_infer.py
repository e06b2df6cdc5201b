"""Files without a config: the architecture is read off the tensors, the original YAML settles
what they cannot tell (heads, SDXL's time-id width), and ``inspect`` says what a loader would
refuse. Sizes here are unreleased ones (32-channel levels, uneven depths, other widths)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from controlnet import ControlNet, ControlNetConfig, Family
from controlnet.cli import main
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import unet_config, vae_config
from controlnet.formats import BaseConfig, CheckpointError, inspect_checkpoint, load_base, load_controlnet
from controlnet.formats import original as orig
from controlnet.formats.build import build_text_encoder, build_unet, build_vae
from controlnet.formats.infer import unet_config_diffusers_names, unet_config_original_names
from controlnet.text.tokenizer import clip_tokenizer
from tiny import assert_same_state, released_file, schedule_buffers

HINT = ControlNetConfig(hint_block_channels=(4, 8, 8, 16))
CONTEXT = 48
#: attention heads 16 channels wide (SD2/SDXL-like) or 4 per level (SD1-like): neither is a
#: family's convention, so only the YAML can tell them
STRUCTURES = {
    "sd1": {"attention_head_dim": 4},
    "sd2": {"attention_head_dim": [2, 4, 6], "use_linear_projection": True},
    "sdxl": {
        "attention_head_dim": [2, 4, 6],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
    },
}
YAML_HEADS = {"sd1": {"num_heads": 4}, "sd2": {"num_head_channels": 16}, "sdxl": {"num_head_channels": 16}}


def odd_unet_config(structure: str) -> dict:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 96],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": CONTEXT,
        "norm_num_groups": 32,
        **STRUCTURES[structure],
    }


def odd_controlnet(structure: str) -> ControlNet:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**odd_unet_config(structure))
    cn = ControlNet.from_unet(unet, HINT)
    with torch.no_grad():  # open the zero convs: residuals that are not all zero
        for z in cn.zero_convs():
            for p in z.parameters():
                p.normal_(0, 0.1)
    return cn.eval()


def cldm_yaml(path, control: dict | None = None, **params) -> None:
    """An original YAML: ``control_stage_config`` params and any other ``model.params``."""
    doc = {"model": {"params": dict(params)}}
    if control is not None:
        doc["model"]["params"]["control_stage_config"] = {"params": control}
    path.write_text(yaml.safe_dump(doc))


def xl_conditioner(outdim: int) -> dict:
    embedders = [
        {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": outdim}}
    ]
    return {"conditioner_config": {"params": {"emb_models": embedders}}}


def residuals(cn: ControlNet, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, CONTEXT, generator=g),
    }
    if cn.unet_config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.rand(1, 6, generator=g) * 64,
        }
    hint = cn.encode_hint(torch.rand(1, 3, 64, 64, generator=g))
    with torch.no_grad():
        return list(cn(**inputs, hint=hint))


def same_residuals(a: ControlNet, b: ControlNet) -> bool:
    return all(torch.equal(x, y) for x, y in zip(residuals(a), residuals(b), strict=True))


# ------------------------------------------------------------------------------------ released sizes
@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.value)
def test_released_sizes_read_back_as_the_released_configs(family):
    """On the meta device at full size: the config read off the tensors is the family's own, in
    both layouts (so nothing changed for the files people have), inpainting's 9 channels too."""
    cfg = {**unet_config(family), "in_channels": 9}
    cn = ControlNet.from_config(cfg, device="meta")
    shapes = {k: tuple(v.shape) for k, v in orig.controlnet_tensors(cn).items()}
    assert unet_config_original_names(shapes, orig.CONTROL, "x") == cfg
    ours = {k: tuple(v.shape) for k, v in cn.state_dict().items()}
    assert unet_config_diffusers_names(ours, "x") == cfg

    full = BaseConfig.for_family(family)
    base = UNetBase(
        family,
        build_unet(full.unet),
        build_vae(full.vae),
        build_text_encoder(full.text_encoder),
        clip_tokenizer(family),
        text_encoder_2=None if full.text_encoder_2 is None else build_text_encoder(full.text_encoder_2),
        tokenizer_2=None if full.text_encoder_2 is None else clip_tokenizer(family, second=True),
    )
    shapes = {k: tuple(v.shape) for k, v in orig.base_tensors(base).items()}
    if family is Family.SD2:  # the released files hold OpenCLIP's 24th layer, which is not built
        shapes[orig.TEXT_SD2 + "transformer.resblocks.23.mlp.c_fc.weight"] = (4096, 1024)
    from test_formats_real_keys import meta_file

    got = orig.base_config(meta_file(shapes, "x.safetensors")[0])
    assert (got.family, got.unet, got.vae, got.text_encoder, got.text_encoder_2) == (
        family,
        full.unet,
        full.vae,
        full.text_encoder,
        full.text_encoder_2,
    )


# ------------------------------------------------------------------------------------ unreleased sizes
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_an_unreleased_size_loads_from_its_tensors_and_the_yaml_beside_it(structure, tmp_path):
    cn = odd_controlnet(structure)
    path = released_file(tmp_path / "odd.safetensors", orig.controlnet_tensors(cn), "safetensors")
    extra = xl_conditioner(8) if structure == "sdxl" else {}
    cldm_yaml(path.with_suffix(".yaml"), control=YAML_HEADS[structure], **extra)
    back = load_controlnet(path)
    assert_same_state(cn, back)
    assert back.config == cn.config
    for key in (
        "block_out_channels",
        "transformer_layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
    ):
        assert list(torch.tensor(back.unet_config[key]).reshape(-1)) == list(
            torch.tensor(cn.unet_config[key]).reshape(-1)
        ), key
    assert same_residuals(cn, back)


def test_without_a_yaml_heads_follow_the_family_convention_and_say_so(tmp_path):
    """SD1 structure: 8 heads assumed, with a warning naming --config; the 4-head model then
    computes something else (which is why it warns). SD2 structure at 32 channels: 64-channel
    heads cannot be, so the file is refused asking for the YAML."""
    cn = odd_controlnet("sd1")
    path = released_file(tmp_path / "odd1.safetensors", orig.controlnet_tensors(cn), "safetensors")
    with pytest.warns(UserWarning, match=r"odd1\.safetensors: attention heads are not stored .* --config"):
        guessed = load_controlnet(path)
    assert guessed.unet_config["attention_head_dim"] == 8 and not same_residuals(cn, guessed)

    cn2 = odd_controlnet("sd2")
    path2 = released_file(tmp_path / "odd2.safetensors", orig.controlnet_tensors(cn2), "safetensors")
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointError, match=r"odd2\.safetensors: width 32 .* --config"),
    ):
        load_controlnet(path2)

    xl = odd_controlnet("sdxl")
    path3 = released_file(tmp_path / "odd3.safetensors", orig.controlnet_tensors(xl), "safetensors")
    cldm_yaml(path3.with_suffix(".yaml"), control=YAML_HEADS["sdxl"])  # heads, but no conditioner
    with pytest.raises(CheckpointError, match=r"odd3\.safetensors: the added embedding reads 80 features"):
        load_controlnet(path3)


def test_config_flag_converts_a_file_whose_yaml_is_elsewhere(tmp_path, capsys):
    cn = odd_controlnet("sdxl")
    path = released_file(tmp_path / "odd.safetensors", orig.controlnet_tensors(cn), "safetensors")
    config = tmp_path / "configs" / "cldm_odd.yaml"
    config.parent.mkdir()
    cldm_yaml(config, control=YAML_HEADS["sdxl"], **xl_conditioner(8))
    out = tmp_path / "odd_ours.safetensors"
    assert main(["convert", str(path), str(out), "--to", "controlnet", "--config", str(config)]) == 0
    back = load_controlnet(out)  # our format carries the architecture from now on
    assert same_residuals(cn, back)
    # a YAML is for original-layout files only; one that is not there is named
    assert main(["inspect", str(out), "--config", str(config)]) == 2
    assert "describes original-layout files only" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                str(path),
                str(tmp_path / "x.safetensors"),
                "--to",
                "controlnet",
                "--config",
                "nope.yaml",
            ]
        )
        == 2
    )
    assert "nope.yaml: config not found" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_yaml_that_disagrees_with_the_tensors_is_named(tmp_path):
    cn = odd_controlnet("sd2")
    path = released_file(tmp_path / "odd.safetensors", orig.controlnet_tensors(cn), "safetensors")
    cldm_yaml(path.with_suffix(".yaml"), control={"num_head_channels": 16, "model_channels": 320})
    with pytest.raises(
        CheckpointError, match=r"odd\.yaml: model_channels is 320, but the tensors of .* say 32"
    ):
        load_controlnet(path)


def test_an_unreleased_base_model_loads_whole(tmp_path):
    """UNet, VAE and text encoder of sizes no family has, one original file, the YAML beside it."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        **{
            **vae_config(Family.SD1),
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
        }
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=CONTEXT + 16,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(**{**odd_unet_config("sd1"), "cross_attention_dim": CONTEXT + 16}).eval()
    base = UNetBase(Family.SD1, unet, vae.eval(), text.eval(), clip_tokenizer(Family.SD1))
    path = released_file(
        tmp_path / "odd_base.ckpt", {**orig.base_tensors(base), **schedule_buffers()}, "ckpt"
    )
    cldm_yaml(path.with_suffix(".yaml"), unet_config={"params": {"num_heads": 4}}, scale_factor=0.5)
    back = load_base(path)
    for name, module in base.modules().items():
        assert_same_state(module, back.modules()[name])
    assert back.family is Family.SD1 and back.latent_scale == 0.5
    assert back.unet.config.attention_head_dim == 4 and back.text_encoder.config.num_attention_heads == 1
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, CONTEXT + 16, generator=g)
    with torch.no_grad():
        assert torch.equal(unet(x, 10, ctx).sample, back.unet(x, 10, ctx).sample)


# ------------------------------------------------------------------------------------ inspect
def test_inspect_says_what_every_loader_would_refuse(tmp_path, capsys):
    cn = odd_controlnet("sd2")
    good = orig.controlnet_tensors(cn)
    yaml_text = yaml.safe_dump({"model": {"params": {"control_stage_config": {"params": YAML_HEADS["sd2"]}}}})

    def write(name: str, tensors: dict):
        path = released_file(tmp_path / name, tensors, "safetensors")
        path.with_suffix(".yaml").write_text(yaml_text)
        return path

    ok = write("ok.safetensors", good)
    assert main(["inspect", str(ok)]) == 0
    assert "check:      controlnet: loads (every key and shape checked)" in capsys.readouterr().out

    missing = dict(good)
    del missing["control_model.zero_convs.3.0.bias"]
    extra = {**good, "control_model.zero_convs.3.0.scale": torch.ones(1)}
    shaped = {**good, "control_model.middle_block_out.0.bias": torch.zeros(7)}
    cases = {
        "missing.safetensors": (missing, r"missing keys \(1\): control_model\.zero_convs\.3\.0\.bias"),
        "extra.safetensors": (extra, r"unexpected keys \(1\): control_model\.zero_convs\.3\.0\.scale"),
        "shaped.safetensors": (
            shaped,
            r"shape mismatch \(1\): control_model\.middle_block_out\.0\.bias: file \(7,\)",
        ),
    }
    for name, (tensors, said) in cases.items():
        path = write(name, tensors)
        info = inspect_checkpoint(path)
        assert info.refused and info.parameters and info.format.value == "original", name
        assert main(["inspect", str(path)]) == 1
        printed = capsys.readouterr().out
        line = [ln for ln in printed.splitlines() if ln.startswith("check:")]
        assert len(line) == 1 and str(path) in line[0], printed
        assert re.search(said, line[0]), line[0]
        with pytest.raises(CheckpointError, match=said):  # the loader says the same
            load_controlnet(path)

    # a base model part: the same checks, every part
    base_missing = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    vae = AutoencoderKL(
        **vae_config(Family.SD1)
        | {
            "block_out_channels": [32, 32],
            "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
        }
    )
    unet = UNet2DConditionModel(**{**odd_unet_config("sd1"), "cross_attention_dim": 64})
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
    )
    tensors = orig.base_tensors(UNetBase(Family.SD1, unet, vae, text, clip_tokenizer(Family.SD1)))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(orig.VAE)}
    released_file(base_missing, tensors, "safetensors")
    base_missing.with_suffix(".yaml").write_text(
        "model:\n  params:\n    unet_config:\n      params:\n        num_heads: 4\n"
    )
    info = inspect_checkpoint(base_missing)
    assert info.loads["base"] is not None and "has no vae (first_stage_model.* keys)" in info.loads["base"]


def test_the_command_line_shows_the_heads_warning_in_one_line(tmp_path, capsys):
    cn = odd_controlnet("sd1")
    path = released_file(tmp_path / "odd.safetensors", orig.controlnet_tensors(cn), "safetensors")
    assert main(["convert", str(path), str(tmp_path / "ours.safetensors"), "--to", "controlnet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("controlnet convert: warning: ") and "--config" in err[0], err
