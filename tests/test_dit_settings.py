"""Generation settings travel with a transformer base model in our format, as with the UNets':
`controlnet convert --settings` keeps them in the file, loading reads them back, they apply over
the family's own defaults wherever the model is used, and a diffusers folder (no place for them)
refuses them in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from controlnet.cli import main
from controlnet.families import generation_settings
from controlnet.formats import load_base, save_base
from test_qwenimage_generate import qwen_base
from tiny_flux import tiny_flux_base

BASES = {"flux": tiny_flux_base, "qwenimage": qwen_base}


@pytest.mark.parametrize("family", sorted(BASES))
def test_settings_given_at_conversion_are_kept_and_applied(family, tmp_path, capsys):
    plain = save_base(BASES[family](), tmp_path / "plain.safetensors")[0]
    defaults = generation_settings(plain)  # the family's own
    assert defaults["sampler"] == "euler" and "guidance" in defaults

    own = tmp_path / "own.safetensors"
    given = {"guidance": 2.25, "steps": 3}
    assert main(["convert", str(plain), str(own), "--to", "controlnet", "--settings", json.dumps(given)]) == 0
    assert generation_settings(own) == {**defaults, **given}
    assert load_base(own).settings == given
    again = save_base(load_base(own), tmp_path / "again.safetensors")[0]  # kept through a rewrite
    assert generation_settings(again) == {**defaults, **given}

    # generate without --guidance or --steps: the file's own
    cond = tmp_path / "cond.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(cond)
    out = tmp_path / "out"
    argv = ["generate", "--base", str(own), "--prompt", "a red disk", "--width", "64", "--height", "64"]
    assert main([*argv, "--seed", "1", "--out", str(out)]) == 0
    record = json.loads(next(out.glob("*.json")).read_text())["request"]
    assert record["guidance"] == 2.25 and record["steps"] == 3 and record["sampler"] == "euler"

    capsys.readouterr()
    folder = ["convert", str(own), str(tmp_path / "folder"), "--to", "diffusers", "--settings", "{}"]
    assert main(folder) != 0
    assert "generation settings go with a base model written in our format" in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(BASES))
def test_a_file_may_say_the_side_it_was_made_for(family, tmp_path, capsys):
    """``resolution`` (what a model trained by our commands records): the model's native size, so
    a generation given no size makes that side, not the family's 1024 or 1328 px; out of the
    request's bounds, it is refused naming the flag."""
    base = BASES[family]()
    assert base.native_size == {"flux": 1024, "qwenimage": 1328}[family]
    plain = save_base(base, tmp_path / "plain.safetensors")[0]
    own = tmp_path / "own.safetensors"
    assert (
        main(["convert", str(plain), str(own), "--to", "controlnet", "--settings", '{"resolution": 64}']) == 0
    )
    assert load_base(own).native_size == 64
    out = tmp_path / "out"
    assert (
        main(["generate", "--base", str(own), "--prompt", "a red disk", "--steps", "1", "--out", str(out)])
        == 0
    )
    image = next(out.glob("*_0.png"))
    assert Image.open(image).size == (64, 64)
    capsys.readouterr()
    bad = ["convert", str(plain), str(tmp_path / "bad.safetensors"), "--to", "controlnet"]
    assert main([*bad, "--settings", '{"resolution": 32}']) == 2
    err = capsys.readouterr().err
    assert "--settings" in err and "resolution" in err and not (tmp_path / "bad.safetensors").exists()
