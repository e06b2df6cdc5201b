"""Checkpoint round trips: every format to every format is bitwise, for each family."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from controlnet import Family
from controlnet.formats import (
    BaseConfig,
    Format,
    check_compatible,
    convert,
    detect,
    load_base,
    load_controlnet,
    save_base,
    save_controlnet,
)
from controlnet.formats.checkpoint import open_tensors
from controlnet.formats.original import base_tensors, controlnet_tensors, read_schedule
from tiny import (
    assert_same_state,
    cond_image,
    make_base,
    make_controlnet,
    make_unet,
    released_file,
    schedule_buffers,
    unet_inputs,
)


def out(tmp_path, name: str, fmt: Format):
    return tmp_path / (name if fmt is Format.DIFFUSERS else f"{name}.safetensors")


def assert_same_controlnet(a, b):
    assert_same_state(a, b)
    assert a.config == b.config
    check_compatible(a, b)  # the UNet fields a ControlNet depends on agree


def assert_same_base(a, b):
    assert a.family is b.family
    assert a.modules().keys() == b.modules().keys()
    for name in a.modules():
        assert_same_state(a.modules()[name], b.modules()[name])
    assert a.schedule == b.schedule
    assert a.tokenizer.pad_token == b.tokenizer.pad_token


#: Each format is written, then read back and written as the next one: every reader reads every
#: writer's output once (a conversion is a read then a write), at a third of the full matrix's cost.
CYCLE = [Format.CONTROLNET, Format.ORIGINAL, Format.DIFFUSERS, Format.CONTROLNET]


def test_controlnet_round_trip_through_every_format(family, tmp_path):
    cn = make_controlnet(make_unet(family), open_zero=True)
    current = cn
    for i, fmt in enumerate(CYCLE):
        path = save_controlnet(current, out(tmp_path, f"cn{i}_{fmt.value}", fmt), fmt)[0]
        assert detect(path).format is fmt
        current = load_controlnet(path)
        assert_same_controlnet(cn, current)


def test_convert_every_format_to_every_format(tmp_path):
    cn = make_controlnet(make_unet(Family.SD1), open_zero=True)
    for src in Format:
        first = save_controlnet(cn, out(tmp_path, f"cn_{src.value}", src), src)[0]
        for dst in Format:
            second = convert(first, out(tmp_path, f"cn_{src.value}_to_{dst.value}", dst), dst)[0]
            assert_same_controlnet(cn, load_controlnet(second))


def test_loaded_controlnet_gives_the_same_residuals(tmp_path):
    unet = make_unet(Family.SD2)  # per-level head counts and linear projections: configs must survive
    cn = make_controlnet(unet, open_zero=True)
    path = save_controlnet(cn, tmp_path / "cn.safetensors", Format.ORIGINAL)[0]
    back = load_controlnet(path)
    inputs = unet_inputs(unet)
    hint = cn.encode_hint(cond_image())
    with torch.no_grad():
        for r0, r1 in zip(cn(**inputs, hint=hint), back(**inputs, hint=back.encode_hint(cond_image()))):
            assert torch.equal(r0, r1)


def test_base_round_trip_through_every_format(family, tmp_path):
    base = make_base(family)
    current = base
    for i, fmt in enumerate(CYCLE):
        path = save_base(current, out(tmp_path, f"base{i}_{fmt.value}", fmt), fmt)[0]
        current = load_base(path)
        assert_same_base(base, current)
    prompt = ["a red circle"]
    assert torch.equal(current.encode_prompt(prompt).context, base.encode_prompt(prompt).context)


def test_v10_file_holds_both_and_each_part_converts(tmp_path):
    base = make_base(Family.SD1)
    cn = make_controlnet(base.unet, open_zero=True)
    full = save_controlnet(cn, tmp_path / "control_sd15_tiny.safetensors", Format.ORIGINAL, base=base)[0]
    assert detect(full).kinds == ("base", "controlnet")
    assert_same_controlnet(cn, load_controlnet(full))
    convert(full, tmp_path / "only_base.safetensors", Format.CONTROLNET, part="base")
    assert_same_base(base, load_base(tmp_path / "only_base.safetensors"))


def test_global_pool_survives_every_format(tmp_path):
    base = make_base(Family.SD1)
    cn = make_controlnet(base.unet, open_zero=True, global_pool=True)
    for fmt in Format:
        paths = save_controlnet(cn, out(tmp_path, f"shuffle_{fmt.value}", fmt), fmt)
        back = load_controlnet(paths[0])
        assert back.config.global_pool
        assert_same_controlnet(cn, back)
        if fmt is Format.ORIGINAL:  # the v1.1 convention: a same-named yaml beside the weights
            side = yaml.safe_load(paths[1].read_text())
            params = side["model"]["params"]["control_stage_config"]["params"]
            assert paths[1].suffix == ".yaml" and params["global_average_pooling"] is True


def test_half_precision_files_keep_their_dtype(tmp_path):
    cn = make_controlnet(make_unet(Family.SD2), open_zero=True).half()
    for fmt in Format:
        path = save_controlnet(cn, out(tmp_path, f"cn_{fmt.value}", fmt), fmt)[0]
        back = load_controlnet(path)
        assert back.dtype == torch.float16
        assert_same_controlnet(cn, back)
    as_fp32 = load_controlnet(path, dtype=torch.float32)  # cast on request only
    assert all(
        t.dtype == torch.float32 and torch.equal(t, cn.state_dict()[k].float())
        for k, t in as_fp32.state_dict().items()
    )
    base = make_base(Family.SDXL).to(dtype=torch.bfloat16)
    back = load_base(save_base(base, tmp_path / "base.safetensors", Format.ORIGINAL)[0])
    assert back.dtype == torch.bfloat16
    assert_same_base(base, back)


@pytest.mark.parametrize(
    ("family", "kind"), [(Family.SD1, "pth"), (Family.SD2, "ckpt"), (Family.SDXL, "safetensors")], ids=str
)
def test_released_layouts_without_our_metadata(family, kind, tmp_path):
    """Files as released (v1.0: everything in one pickle; v1.1: control_model only, a .yaml for
    shuffle) carry no config: tiny architectures are passed in, real sizes are inferred (see
    test_formats_real_keys)."""
    base = make_base(family)
    cn = make_controlnet(base.unet, open_zero=True, global_pool=True)
    v10 = {**base_tensors(base), **controlnet_tensors(cn), **schedule_buffers()}
    path = released_file(tmp_path / f"control_tiny.{kind}", v10, kind)
    assert detect(path).format is Format.ORIGINAL and detect(path).kinds == ("base", "controlnet")
    assert_same_controlnet(cn, load_controlnet(path, unet_config=cn.unet_config, config=cn.config))
    assert_same_base(base, load_base(path, config=BaseConfig.of(base)))

    v11 = released_file(tmp_path / f"control_v11e_tiny_shuffle.{kind}", controlnet_tensors(cn), kind)
    no_yaml = load_controlnet(v11, unet_config=cn.unet_config)  # hint encoder read off shapes
    assert no_yaml.config.hint_block_channels == cn.config.hint_block_channels
    assert not no_yaml.config.global_pool
    v11.with_suffix(".yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n        global_average_pooling: True\n"
    )
    assert_same_controlnet(cn, load_controlnet(v11, unet_config=cn.unet_config))


def test_schedule_read_from_the_betas_and_the_yaml(tmp_path):
    base = make_base(Family.SD2)
    path = released_file(
        tmp_path / "sd2_tiny_v.ckpt", {**base_tensors(base), **schedule_buffers(500)}, "ckpt"
    )
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    got = read_schedule(open_tensors(path), dict(base.schedule))
    assert got == {**base.schedule, "num_train_timesteps": 500, "prediction_type": "v_prediction"}


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL], ids=lambda f: f.value)
def test_diffusers_reads_our_folders(family, tmp_path, monkeypatch):
    """The diffusers / transformers classes load what we write, and compute what we compute."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = make_unet(family)
    cn = make_controlnet(unet, open_zero=True)
    folder = save_controlnet(cn, tmp_path / "cn", Format.DIFFUSERS)[0]
    theirs = ControlNetModel.from_pretrained(folder).eval()
    assert_same_state(cn, theirs)
    inputs = unet_inputs(unet)
    cond = cond_image()
    with torch.no_grad():
        down, mid = theirs(**{**inputs, "controlnet_cond": cond}, return_dict=False)
        ours = cn(**inputs, hint=cn.encode_hint(cond))
    # same tensors (checked bitwise above), same maths; two module instances may pick different
    # CPU kernels for the 1x1 levels, so the outputs agree to float32 rounding, not bit for bit
    for a, b in zip([*down, mid], ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    base = make_base(family)
    pipe = save_base(base, tmp_path / "pipe", Format.DIFFUSERS)[0]
    assert_same_state(base.unet, UNet2DConditionModel.from_pretrained(pipe / "unet"))
    assert_same_state(base.vae, AutoencoderKL.from_pretrained(pipe / "vae"))
    assert_same_state(base.text_encoder, CLIPTextModel.from_pretrained(pipe / "text_encoder"))
    if family is Family.SDXL:
        te2 = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2")
        assert_same_state(base.text_encoder_2, te2)


def test_original_layout_agrees_with_diffusers_own_conversion(family):
    """An independent check of our ldm names: diffusers' single-file converter maps what we
    write back to exactly our tensors (its ControlNet converter skips SDXL's label_emb)."""
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    base = make_base(family)
    cn = make_controlnet(base.unet, open_zero=True)
    ckpt = {**base_tensors(base), **controlnet_tensors(cn)}
    unet = su.convert_ldm_unet_checkpoint(ckpt, dict(base.unet.config))
    vae = su.convert_ldm_vae_checkpoint(ckpt, dict(base.vae.config))
    cfg = {**cn.unet_config, "conditioning_embedding_out_channels": list(cn.config.hint_block_channels)}
    control = su.convert_controlnet_checkpoint(ckpt, cfg)
    for theirs, module in ((unet, base.unet), (vae, base.vae), (control, cn)):
        mine = module.state_dict()
        skipped = {k for k in mine if k.startswith("add_embedding.")} if module is cn else set()
        assert theirs.keys() == mine.keys() - skipped
        assert all(torch.equal(theirs[k].reshape(mine[k].shape), mine[k]) for k in theirs)


def test_diffusers_folders_with_variant_pickled_or_sharded_weights(tmp_path):
    """Folders fetched with variant='fp16' hold *.fp16.safetensors; older ones *.bin pickles."""
    cn = make_controlnet(make_unet(Family.SD1), open_zero=True)
    folder = save_controlnet(cn, tmp_path / "cn", Format.DIFFUSERS)[0]
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    assert_same_controlnet(cn, load_controlnet(folder))
    (folder / "diffusion_pytorch_model.fp16.safetensors").unlink()
    torch.save(cn.state_dict(), folder / "diffusion_pytorch_model.bin")
    assert_same_controlnet(cn, load_controlnet(folder))
    # sharded: an index naming the file of each tensor
    (folder / "diffusion_pytorch_model.bin").unlink()
    state = cn.state_dict()
    halves = {"a.safetensors": list(state)[::2], "b.safetensors": list(state)[1::2]}
    for name, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / name))
    weight_map = {k: name for name, keys in halves.items() for k in keys}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_controlnet(cn, load_controlnet(folder))
