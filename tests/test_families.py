"""The model-family protocol: the UNet families implement it, and a family of another kind (a toy
token transformer, tests/toy_family.py) runs through generation, the command line and the registry
without a change to them."""

import json

import numpy as np
import pytest
from PIL import Image

import toy_family
from controlnet import Family, families
from controlnet.cli import main
from controlnet.families.protocol import BaseModel
from controlnet.generation.check import check
from controlnet.generation.generate import generate
from controlnet.generation.request import ControlRequest, GenerationRequest
from tiny import make_base


def test_the_unet_families_implement_the_protocol(family):
    base = make_base(family)
    assert isinstance(base, BaseModel)
    assert base.denoiser is base.unet and base.latent_channels == 4
    cn = base.new_controlnet()
    base.check_controlnet(cn, controlnet_name="cn", base_name="base")


def test_the_toy_family_implements_the_protocol():
    assert isinstance(toy_family.make_base(), BaseModel)


@pytest.fixture
def outline(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:20] = image[16:48, 44:48] = 255
    Image.fromarray(image).save(tmp_path / "outline.png")
    return str(tmp_path / "outline.png")


def _request(outline, **kw):
    kw.setdefault("controls", [ControlRequest(outline)] if outline else [])
    return GenerationRequest(
        prompt="a toy", added_prompt="", steps=4, seed=3, num_samples=2, guidance=4.0, **kw
    )


def test_generation_runs_a_token_transformer_family_unchanged(outline):
    """The same generate() drives a transformer over packed latents; a fresh ControlNet of it (zero
    layers) leaves the base's images bit-identical, a trained one changes them."""
    base = toy_family.make_base()
    plain = generate(check(_request(None)), base, [], progress=False).images
    fresh = generate(check(_request(outline)), base, [base.new_controlnet()], progress=False).images
    trained = generate(check(_request(outline)), base, [toy_family.trained_controlnet(base)], progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(plain, fresh))
    assert not np.array_equal(plain[0], trained.images[0])
    assert len(trained.images) == 2 and trained.images[0].shape == (64, 64, 3)
    # per-control settings are the generic ones: strength 0 is no control at all
    off = generate(
        check(_request(None, controls=[ControlRequest(outline, strength=0.0)])),
        base,
        [toy_family.trained_controlnet(base)],
        progress=False,
    ).images
    assert np.array_equal(off[0], plain[0])


def test_a_registered_family_loads_and_runs_from_the_command_line(outline, tmp_path, monkeypatch, capsys):
    """Registering a family is one entry in the registry: the command line then loads its files and
    generates with them, its sidecar replaying bit for bit."""
    monkeypatch.setitem(families.PLUGINS, "toy", "toy_family")
    base_file = toy_family.write(tmp_path / "toy-base.json", "base", 0)
    cn_file = toy_family.write(tmp_path / "toy-cn.json", "controlnet", 1)
    assert families.plugin_for(base_file) is toy_family
    out = tmp_path / "out"
    argv = ["generate", "--base", str(base_file), "--controlnet", str(cn_file), "--image", outline]
    argv += ["--prompt", "a toy", "--steps", "3", "--seed", "5", "--resolution", "64", "--out", str(out)]
    assert main([*argv, "--quiet", "--device", "cpu"]) == 0, capsys.readouterr().err
    sidecar = next(out.glob("*.json"))
    assert json.loads(sidecar.read_text())["request"]["base"] == str(base_file)
    assert main(["generate", "--from-sidecar", str(sidecar), "--quiet", "--out", str(tmp_path / "r")]) == 0
    # a file no family reads: one line from each family
    (tmp_path / "notes.json").write_text("{}")
    argv[2] = str(tmp_path / "notes.json")
    assert main([*argv, "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Toy token transformer" in err and "Stable Diffusion" in err


def test_a_model_of_one_family_is_refused_beside_another(outline):
    base = make_base(Family.SD1)
    toy = toy_family.make_base()
    with pytest.raises(ValueError, match="is not a toy ControlNet"):
        generate(check(_request(outline)), toy, [base.new_controlnet()], progress=False)
    with pytest.raises(ValueError):
        generate(check(_request(outline)), base, [toy.new_controlnet()], progress=False)
