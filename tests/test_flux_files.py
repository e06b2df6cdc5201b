"""Flux.1 base models on disk and on the command line: diffusers' own pipeline folder and ours
load offline key by key and round-trip bitwise; `controlnet generate` runs a Flux base with a
Flux ControlNet from files, with the family's sampling defaults, and its sidecar replays."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image

from controlnet.cli import main
from controlnet.families.flux import FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.families.flux.schedule import FLUX_SCHEDULE
from controlnet.formats import (
    CheckpointError,
    Format,
    detect,
    inspect_checkpoint,
    load_base,
    save_base,
    save_controlnet,
)
from tiny_flux import controlnet, tiny_flux_base


@pytest.fixture(scope="module")
def base() -> FluxBase:
    return tiny_flux_base(max_sequence_length=512)


def same(a: FluxBase, b: FluxBase) -> None:
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.schedule == b.schedule and a.max_sequence_length == b.max_sequence_length
    text = "a red disk on blue"
    assert a.tokenizer_2(text).input_ids == b.tokenizer_2(text).input_ids


def test_diffusers_own_folder_and_ours_load_and_round_trip(base, tmp_path):
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        transformer=base.transformer,
    )
    pipe.save_pretrained(tmp_path / "hub")  # the layout people download
    d = detect(tmp_path / "hub")
    assert d.family == "flux" and d.kinds == ("base",)
    same(base, load_base(tmp_path / "hub"))

    ours = save_base(load_base(tmp_path / "hub"), tmp_path / "flux.safetensors")[0]
    assert detect(ours).layout == "Flux.1 base model"
    same(base, load_base(ours))
    folder = save_base(load_base(ours), tmp_path / "again", "diffusers")[0]
    same(base, load_base(folder))
    back = FluxPipeline.from_pretrained(folder)  # diffusers reads ours
    assert torch.equal(back.transformer.x_embedder.weight, base.transformer.x_embedder.weight)

    info = inspect_checkpoint(ours)
    assert not info.refused and info.loads == {"base": None}


def test_bad_flux_folders_are_named(base, tmp_path):
    folder = save_base(base, tmp_path / "f", "diffusers")[0]
    (folder / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"tokenizer_2: no T5 tokenizer \(tokenizer\.json or spiece\.model\)"
    ):
        load_base(folder)


def test_generate_from_files_with_the_family_defaults_and_replay(base, tmp_path, capsys):
    folder = save_base(base, tmp_path / "flux", "diffusers")[0]
    cn = save_controlnet(
        controlnet(base, FluxControlNetConfig(1, 2, num_mode=3), seed=2), tmp_path / "u.safetensors"
    )[0]
    cond = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)).save(cond)
    argv = ["generate", "--base", str(folder), "--controlnet", str(cn), "--image", str(cond)]
    argv += ["--prompt", "a red disk", "--width", "128", "--height", "64", "--steps", "3", "--seed", "5"]
    out = tmp_path / "out"
    # a Union ControlNet needs its control type
    assert main([*argv, "--out", str(out)]) == 2
    assert "controls[0].control_type: its Union ControlNet needs one (0-2)" in capsys.readouterr().err
    assert main([*argv, "--control-type", "1", "--out", str(out)]) == 0
    sidecar = next(out.glob("*.json"))
    record = json.loads(sidecar.read_text())["request"]
    # Flux's own defaults, not SD's: Euler over the shifted schedule, guidance 3.5 as an input
    assert record["sampler"] == "euler" and record["guidance"] == 3.5 and record["negative_prompt"] == ""
    assert record["controls"][0]["control_type"] == 1
    image = np.asarray(Image.open(next(out.glob("*_0.png"))))
    assert image.shape == (64, 128, 3)
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again")]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_models_of_other_families_and_bad_modes_are_refused_in_one_line(base, tmp_path, capsys):
    import shutil

    from controlnet.bundled import BUNDLED_CONTROLNET, bundled_path

    folder = save_base(base, tmp_path / "flux", "diffusers")[0]
    union = save_controlnet(
        controlnet(base, FluxControlNetConfig(1, 1, num_mode=3), seed=2), tmp_path / "u.safetensors"
    )[0]
    cond = tmp_path / "cond.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(cond)
    common = ["generate", "--image", str(cond), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o")]
    cases = [
        (["--controlnet", str(union)], "is a FluxControlNet, not a ControlNet of a UNet"),  # SD base
        (
            ["--base", str(folder), "--controlnet", str(bundled_path(BUNDLED_CONTROLNET))],
            "is not a Flux ControlNet",
        ),
        (["--base", str(folder), "--controlnet", str(union), "--control-type", "5"], "knows 0-2"),
        (["--base", str(folder), "--controlnet", str(union)], "needs one (0-2)"),
    ]
    for extra, said in cases:
        assert main([*common, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
    shutil.rmtree(folder / "text_encoder_2")  # a Flux model without its T5
    assert main([*common, "--base", str(folder), "--controlnet", str(union), "--control-type", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the FluxPipeline folder lacks text_encoder_2/config.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_black_forest_labs_files_load_and_round_trip_bitwise(tmp_path):
    from safetensors.torch import load_file

    base = tiny_flux_base(512, config_less=True)  # what BFL's files can hold
    folder = save_base(base, tmp_path / "bfl", Format.ORIGINAL)[0]  # flux1, ae, clip_l, t5xxl, tokenizer
    assert sorted(p.name for p in folder.iterdir()) == [
        "ae.safetensors",
        "clip_l.safetensors",
        "flux1.safetensors",
        "t5xxl.safetensors",
        "tokenizer.json",
    ]
    d = detect(folder)
    assert d.family == "flux" and d.format is Format.ORIGINAL and "Black Forest Labs" in d.layout
    back = load_base(folder)
    same(base, back)
    again = save_base(back, tmp_path / "bfl2", Format.ORIGINAL)[0]
    for name in ("flux1.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl.safetensors"):
        a, b = load_file(folder / name), load_file(again / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the transformer alone is named for what it is, and a missing part is named
    with pytest.raises(CheckpointError, match=r"a Flux\.1 transformer alone; load the folder"):
        load_base(folder / "flux1.safetensors")
    (folder / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"a Flux\.1 model needs its vae \(like ae\.safetensors\)"):
        load_base(folder)


def test_black_forest_labs_layout_at_real_size():
    """Flux.1-dev on the meta device: BFL's fused tensors have their published shapes, every one
    of the 11,901,408,320 parameters has a place, and the architecture reads back from them."""
    from pathlib import Path

    from diffusers import FluxTransformer2DModel

    from controlnet.formats.checkpoint import TensorFile
    from controlnet.formats.flux_bfl import bfl_rule, bfl_transformer_config
    from controlnet.formats.keymap import to_file

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320
    state = model.state_dict()
    tensors = to_file(state, [bfl_rule(k, 3072) for k in state])
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    known = {
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.18.txt_mlp.0.weight": (12288, 3072),
        "single_blocks.37.linear1.weight": (21504, 3072),
        "single_blocks.0.linear2.weight": (3072, 15360),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "guidance_in.in_layer.weight": (3072, 256),
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert sum(math.prod(s) for s in shapes.values()) == 11_901_408_320
    tf = TensorFile(
        Path("flux1-dev.safetensors"), shapes, {k: torch.bfloat16 for k in shapes}, lambda k: None
    )
    config = bfl_transformer_config(tf, "")
    assert config["num_layers"] == 19 and config["num_single_layers"] == 38 and config["guidance_embeds"]
    with torch.device("meta"):
        rebuilt = FluxTransformer2DModel(**config)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }


def test_the_server_serves_a_flux_model_alike(base, tmp_path):
    """The API and web app take the same fields for a Flux model (the control type too) and give
    what the library gives, bit for bit."""
    import httpx

    from controlnet.generation.check import check
    from controlnet.generation.defaults import model_settings
    from controlnet.generation.pipeline import run
    from controlnet.generation.request import ControlRequest, GenerationRequest
    from controlnet.serving.server import start
    from controlnet.serving.service import ServeConfig
    from controlnet.serving.units import control_types
    from serving import b64, decode, png_bytes, square

    folder = save_base(base, tmp_path / "flux.safetensors", "controlnet")[0]
    union = controlnet(base, FluxControlNetConfig(1, 1, num_mode=3), seed=3)
    cn = save_controlnet(union, tmp_path / "union.safetensors")[0]
    srv = start(ServeConfig(base=str(folder), controlnets=(str(cn),)))
    try:
        with httpx.Client(base_url=srv.url, timeout=300) as client:
            (name,) = client.get("/api/health").json()["control_types"].items()
            assert name == ("union", ["0", "1", "2"])  # what the web app's control units offer for it
            assert control_types(srv.service, "union") == ["0", "1", "2"]
            body = {"prompt": "a square", "steps": 2, "resolution": 64, "seed": 4}
            body["controls"] = [{"image": b64(square()), "control_type": 2}]
            r = client.post("/api/generate", json=body)
            assert r.status_code == 200, r.text
            got = decode(r.json()["images"][0])
            bad = client.post(
                "/api/generate", json={**body, "controls": [{"image": b64(square()), "control_type": 7}]}
            )
            assert bad.status_code == 400 and "control_type" in bad.json()["error"], bad.text
    finally:
        srv.stop()
    (tmp_path / "sq.png").write_bytes(png_bytes(square()))
    control = ControlRequest(image=str(tmp_path / "sq.png"), controlnet=str(cn), control_type=2)
    settings = model_settings(str(folder))  # what the API starts from: the model's own defaults
    assert settings["sampler"] == "euler"
    fields = {"prompt": "a square", "controls": [control], "base": str(folder), "resolution": 64, "seed": 4}
    request = GenerationRequest(**{**settings, **fields, "steps": 2})
    result, _ = run(check(request), progress=False)
    np.testing.assert_array_equal(got, result.images[0])


def test_fp8_stored_files_load_cast_to_the_compute_dtype(tmp_path):
    """Files stored in float8 (as many Flux downloads are) load cast to the dtype asked for; the
    weights are the fp8 values exactly."""
    from safetensors.torch import load_file, save_file

    base = tiny_flux_base(512, config_less=True)
    folder = save_base(base, tmp_path / "bfl", Format.ORIGINAL)[0]
    stored = load_file(folder / "flux1.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in stored.items()}, str(folder / "flux1.safetensors"))
    loaded = load_base(folder, dtype=torch.float32)
    fp8 = {k: v.to(torch.float8_e4m3fn).to(torch.float32) for k, v in base.transformer.state_dict().items()}
    got = loaded.transformer.state_dict()
    assert got.keys() == fp8.keys() and all(torch.equal(got[k], fp8[k]) for k in fp8)
    assert loaded.dtype == torch.float32


@pytest.mark.parametrize("layout", ["scale_weight", "weight_scale"])
def test_scaled_fp8_files_load_dequantized(tmp_path, layout):
    """ComfyUI's scaled-fp8 files (each matrix in float8 with a scale beside it: ``.scale_weight``
    and a ``scaled_fp8`` marker, or ``.weight_scale`` with input scales and ``.comfy_quant``
    markers) load as ``weight * scale``: what the same weights stored dequantized load as."""
    from safetensors.torch import load_file, save_file

    base = tiny_flux_base(512, config_less=True)
    folder = save_base(base, tmp_path / "bfl", Format.ORIGINAL)[0]
    stored = load_file(folder / "flux1.safetensors")
    scaled, plain = {}, {}
    for k, v in stored.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max().float() / 448
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            stem = k[: -len(".weight")]
            scaled[k], plain[k] = q, q.float() * scale
            scaled[stem + "." + layout] = scale
            if layout == "weight_scale":
                scaled[stem + ".input_scale"] = torch.tensor(1.0)
                scaled[stem + ".comfy_quant"] = torch.tensor(
                    list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
                )
        else:
            scaled[k] = plain[k] = v
    if layout == "scale_weight":
        scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(folder / "flux1.safetensors"))
    got = load_base(folder, dtype=torch.float32).transformer.state_dict()
    save_file(plain, str(folder / "flux1.safetensors"))
    want = load_base(folder, dtype=torch.float32).transformer.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], base.transformer.state_dict()[k]) for k in want)  # fp8 rounding
    bad = next(k for k in scaled if k.endswith("." + layout))
    save_file({**scaled, bad: torch.ones(3)}, str(folder / "flux1.safetensors"))
    with pytest.raises(
        CheckpointError, match=rf"scale '{re.escape(bad)}' has shape \(3,\), expected one value"
    ):
        load_base(folder, dtype=torch.float32)


def test_init_makes_a_fresh_transformer_controlnet_from_a_base_file(base, tmp_path, capsys):
    from controlnet.formats import load_controlnet

    folder = save_base(base, tmp_path / "flux", "diffusers")[0]
    out = tmp_path / "union.safetensors"
    assert (
        main(
            [
                "init",
                "--base",
                str(folder),
                "--out",
                str(out),
                "--blocks",
                "1",
                "--single-blocks",
                "2",
                "--union-modes",
                "4",
            ]
        )
        == 0
    )
    cn = load_controlnet(out)
    assert (cn.config.num_layers, cn.config.num_single_layers, cn.config.num_mode) == (1, 2, 4)
    state = base.transformer.state_dict()
    assert all(
        torch.equal(v, state[k]) for k, v in cn.state_dict().items() if k in state and "controlnet" not in k
    )
    assert not any(v.any() for k, v in cn.state_dict().items() if k.startswith("controlnet_blocks"))
    assert (
        main(["init", "--base", str(folder), "--out", str(tmp_path / "x.safetensors"), "--global-pool"]) == 2
    )
    assert "are for UNet ControlNets" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_flux_union_modes_by_their_published_names(base):
    """A Flux Union ControlNet of the published size (10 modes) takes InstantX's / Shakker-Labs'
    mode names as their numbers; one of another size has numbers only, and says so."""
    from controlnet.model.control import control_type_choices, resolve_control_type

    published = controlnet(base, FluxControlNetConfig(1, 1, num_mode=10), seed=1)
    choices = control_type_choices(published)
    assert choices[:7] == ["canny", "tile", "depth", "blur", "pose", "gray", "lq"] and choices[7:] == [
        "7",
        "8",
        "9",
    ]
    where = "controls[0].control_type"
    assert [resolve_control_type(k, published, where) for k in ("depth", "OpenPose", "low-quality", 9)] == [
        2,
        4,
        6,
        9,
    ]
    with pytest.raises(ValueError, match=r"'edges' is not a kind .* one of: canny, tile, depth"):
        resolve_control_type("edges", published, where)
    own = controlnet(base, FluxControlNetConfig(1, 1, num_mode=3), seed=1)
    assert control_type_choices(own) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="expected a mode number 0-2"):
        resolve_control_type("depth", own, where)
