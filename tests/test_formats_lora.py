"""LoRA files in the layouts they come in (kohya / A1111 with diffusers' or the original module
names, diffusers / PEFT), merged into a base model's weights."""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from controlnet import Family
from controlnet.families.sd.configs import unet_config
from controlnet.formats import CheckpointError, merge_loras, read_lora
from controlnet.formats.lora import layer_names
from tiny import kohya, lowrank, lowrank_like, make_base


def save(path, tensors: dict):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def text_layer(te, path: str) -> torch.nn.Module:
    """A text encoder's layer by its name in CLIP files (transformers 5 drops ``text_model.``)."""
    return te.get_submodule(path if hasattr(te, "text_model") else path.removeprefix("text_model."))


def states(base) -> dict:
    return {f"{part}.{k}": v.clone() for part, m in base.modules().items() for k, v in m.state_dict().items()}


def test_kohya_file_merges_scaled_updates_into_exactly_its_layers(tmp_path):
    base = make_base(Family.SD1)
    unet, te = base.unet, base.text_encoder
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q  # linear
    conv = unet.down_blocks[0].resnets[0].conv1  # 3x3 convolution
    proj_in = unet.down_blocks[0].attentions[0].proj_in  # 1x1 convolution in SD1
    q_proj = text_layer(te, "text_model.encoder.layers.0.self_attn.q_proj")
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
            to_q,
            lowrank(*to_q.weight.shape, seed=1),
            1.0,
        ),
        "lora_unet_down_blocks_0_resnets_0_conv1": (
            conv,
            lowrank(conv.out_channels, conv.in_channels, k=3, seed=2),
            4.0,
        ),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (
            proj_in,
            lowrank(proj_in.out_channels, proj_in.in_channels, seed=3),
            None,
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
            q_proj,
            lowrank(*q_proj.weight.shape, seed=4),
            2.0,
        ),
    }
    tensors: dict = {}
    for name, (_, (down, up), alpha) in layers.items():
        kohya(tensors, name, down, up, alpha)
    path = save(tmp_path / "style.safetensors", tensors)
    assert sorted(layer.name for layer in read_lora(path)) == sorted(layers)

    before, old = states(base), {name: m.weight.clone() for name, (m, _, _) in layers.items()}
    assert merge_loras(base, [(path, 0.75)]) == 4
    changed = {k for k, v in states(base).items() if not torch.equal(v, before[k])}
    assert len(changed) == 4 and all(k.endswith(".weight") for k in changed)  # those four, nothing else
    for name, (module, (down, up), alpha) in layers.items():
        rank = down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)) * ((alpha or rank) / rank)
        want = old[name] + 0.75 * delta.reshape(old[name].shape)
        torch.testing.assert_close(module.weight, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("original", "ours"),
    [
        # input_blocks.(1 + 3b + j).1 = down_blocks.b.attentions.j (two layers per block)
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        ),
        ("lora_unet_input_blocks_8_1_proj_out", "lora_unet_down_blocks_2_attentions_1_proj_out"),
        ("lora_unet_input_blocks_3_0_op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
        (
            "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2",
            "lora_unet_mid_block_attentions_0_transformer_blocks_1_ff_net_2",
        ),
        ("lora_unet_middle_block_2_out_layers_3", "lora_unet_mid_block_resnets_1_conv2"),
        # output_blocks.(3b + j) = up_blocks.b; an upsampler after an attention sits at .2
        (
            "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0",
            "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
        ),
        ("lora_unet_output_blocks_2_2_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
        ("lora_unet_output_blocks_4_0_skip_connection", "lora_unet_up_blocks_1_resnets_1_conv_shortcut"),
        (
            "lora_te2_text_model_encoder_layers_1_mlp_fc1",
            "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
        ),
    ],
)
def test_sdxl_original_names_reach_the_same_layers_as_diffusers_names(original, ours):
    names = layer_names(make_base(Family.SDXL))
    assert names[original] is names[ours]


def test_real_size_names_resolve():
    """Names as real SD1.5 and SDXL LoRA files give them, against the full-size UNets (meta)."""
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**unet_config(Family.SD1))
        sdxl = UNet2DConditionModel(**unet_config(Family.SDXL))
    base15, basexl = make_base(Family.SD1), make_base(Family.SDXL)
    names15 = layer_names(replace(base15, unet=sd15))
    assert (
        names15["lora_unet_down_blocks_0_attentions_0_proj_in"] is sd15.down_blocks[0].attentions[0].proj_in
    )
    assert (
        names15["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"]
        is sd15.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_out[0]
    )
    namesxl = layer_names(replace(basexl, unet=sdxl))
    down2 = sdxl.down_blocks[2].attentions[1].transformer_blocks[9]
    assert namesxl["lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2"] is down2.ff.net[2]
    mid = sdxl.mid_block.attentions[0].transformer_blocks[9]
    assert namesxl["lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v"] is mid.attn2.to_v
    up1 = sdxl.up_blocks[1].attentions[2]
    assert namesxl["lora_unet_output_blocks_5_1_proj_out"] is up1.proj_out
    assert (
        namesxl["lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_out_0"]
        is (sdxl.up_blocks[0].attentions[0].transformer_blocks[9].attn1.to_out[0])
    )


@pytest.mark.parametrize(
    "ends", [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")]
)
def test_diffusers_and_peft_layouts(tmp_path, ends):
    base = make_base(Family.SDXL)
    to_k = base.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    fc2 = text_layer(base.text_encoder_2, "text_model.encoder.layers.0.mlp.fc2")
    (d1, u1), (d2, u2) = lowrank(*to_k.weight.shape, seed=5), lowrank(*fc2.weight.shape, seed=6)
    tensors = {
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" + ends[0]: d1,
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" + ends[1]: u1,
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc2" + ends[0]: d2,
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc2" + ends[1]: u2,
    }
    old_k, old_fc2 = to_k.weight.clone(), fc2.weight.clone()
    merge_loras(base, [(save(tmp_path / "peft.safetensors", tensors), 1.0)])
    torch.testing.assert_close(to_k.weight, old_k + u1 @ d1)  # no alpha: the factors as they are
    torch.testing.assert_close(fc2.weight, old_fc2 + u2 @ d2)


def test_several_loras_add_up_and_scale_zero_changes_nothing(tmp_path):
    base = make_base(Family.SD1)
    to_v = base.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    files = []
    for seed in (7, 8):
        tensors: dict = {}
        kohya(tensors, name, *lowrank(*to_v.weight.shape, seed=seed))
        files.append(save(tmp_path / f"l{seed}.safetensors", tensors))
    before = states(base)
    merge_loras(base, [(files[0], 0.0)])
    assert all(torch.equal(v, before[k]) for k, v in states(base).items())
    old = to_v.weight.clone()
    merge_loras(base, [(files[0], 1.0), (files[1], -0.5)])
    (d7, u7), (d8, u8) = lowrank(*to_v.weight.shape, seed=7), lowrank(*to_v.weight.shape, seed=8)
    torch.testing.assert_close(to_v.weight, old + u7 @ d7 - 0.5 * (u8 @ d8))


def test_bad_files_are_refused_whole_and_named(tmp_path):
    base = make_base(Family.SD1)
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    to_q = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    before = states(base)

    def refused(tensors: dict, match: str, name: str = "bad.safetensors", scale: float = 1.0):
        tensors = {**tensors}
        kohya(tensors, good, *lowrank(*to_q.weight.shape))
        with pytest.raises((CheckpointError, ValueError), match=match):
            merge_loras(base, [(save(tmp_path / name, tensors), scale)])
        assert all(torch.equal(v, before[k]) for k, v in states(base).items())  # nothing merged

    other: dict = {}
    kohya(other, "lora_unet_down_blocks_7_attentions_0_proj_in", *lowrank(4, 4))
    refused(other, r"bad\.safetensors: 1 of its 2 layers are not layers of this sd1 model.*down_blocks_7")
    refused({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LyCORIS LoHa")
    wrong: dict = {}
    kohya(wrong, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", *lowrank(3, 5))
    refused(wrong, r"attn1_to_k.*makes a 3 x 5 update, but the model's weight there is")
    refused({"lora_unet_y.lora_down.weight": torch.zeros(2, 4)}, r"'lora_unet_y\.lora_down\.weight' has no")
    refused(
        {"model.diffusion_model.conv_in.weight": torch.zeros(2)},
        r"keys that belong to no LoRA layer \(refused rather than merged in part\): model\.diffusion",
    )
    refused({}, "scale must be a finite number", scale=math.nan)
    down, up = lowrank(*to_q.weight.shape)
    refused(
        {"lora_unet_z.lora_down.weight": down, "lora_unet_z.lora_up.weight": up[:, :1]},
        "do not make a low-rank product",
    )


def test_model_commands_given_a_lora_file_say_what_it_is(tmp_path):
    from controlnet.formats import detect
    from tiny import lora_file

    path = lora_file(tmp_path / "style.safetensors", make_base(Family.SD1).unet)
    with pytest.raises(
        CheckpointError, match=r"style\.safetensors: a LoRA file, not a model: merge it .* --lora"
    ):
        detect(path)


@pytest.mark.parametrize(
    ("family", "layout"), [(Family.SD1, "kohya"), (Family.SDXL, "kohya"), (Family.SD1, "peft")]
)
def test_merges_equal_diffusers_load_lora_weights_and_fuse_lora(tmp_path, family, layout):
    """The same file through diffusers' own loader (kohya conversion, PEFT layers, fuse_lora):
    the same weights. The SDXL file names the UNet's layers as SDXL LoRAs do (original names)."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    base = make_base(family)
    names = layer_names(base)
    if layout == "kohya":
        unet_prefix = "lora_unet_input_blocks_" if family is Family.SDXL else "lora_unet_down_blocks_"
        picked = [k for k in names if k.startswith(unet_prefix) and "attn" in k][:6]
        # whole encoder layers: diffusers' converter wants every projection of a layer
        picked += [k for k in names if k.startswith(("lora_te_", "lora_te1_")) and "layers_0_" in k]
        picked += [k for k in names if k.startswith("lora_te2_") and "layers_1_" in k]
    else:
        picked = [k for k in names if k.startswith("unet.down_blocks.1.attentions.0") and ".attn" in k][:6]
        picked += [k for k in names if k.startswith("text_encoder.") and ".layers.0." in k]
    tensors = {}
    for i, name in enumerate(picked):
        down, up = lowrank_like(names[name].weight, seed=i)
        up = 0.1 * up
        if layout == "kohya":
            kohya(tensors, name, down, up, alpha=3.0)
        else:
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
    path = save(tmp_path / "lora.safetensors", tensors)

    parts = {"vae": base.vae, "unet": base.unet, "text_encoder": base.text_encoder}
    kw = {k: copy.deepcopy(v) for k, v in parts.items()}
    if family is Family.SDXL:
        kw["text_encoder_2"] = copy.deepcopy(base.text_encoder_2)
        pipe = StableDiffusionXLPipeline(
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, scheduler=DDIMScheduler(), **kw
        )
    else:
        pipe = StableDiffusionPipeline(
            tokenizer=base.tokenizer,
            scheduler=DDIMScheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **kw,
        )
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # the PEFT layers go, the fused weights stay

    before = states(base)
    merge_loras(base, [(path, 0.7)])
    after = states(base)
    assert sum(not torch.equal(after[k], before[k]) for k in after) == len(picked)
    for part in [p for p in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, p)]:
        theirs = getattr(pipe, part).state_dict()
        ours = getattr(base, part).state_dict()
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
