"""`controlnet serve` refuses to start, in one line, when it cannot serve what was asked."""

from __future__ import annotations

import socket
import sys

import pytest

from controlnet import Family
from controlnet.cli import main
from controlnet.formats import save_controlnet
from serving import model_files
from tiny import make_base, make_controlnet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-models")
    base, cns = model_files(d)
    save_controlnet(make_controlnet(make_base(Family.SD2).unet), d / "sd2.safetensors")
    return base, cns[0], str(d / "sd2.safetensors")


def serve_error(capsys, *args: str) -> str:
    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_without_gradio_it_names_the_extra(monkeypatch, capsys, models):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    err = serve_error(capsys, "--base", models[0])
    assert err == "controlnet serve: error: the web app needs Gradio: pip install 'controlnet[app]'"


def test_without_the_bundled_model_it_names_the_flag(monkeypatch, capsys, models):
    import controlnet.bundled

    def missing(name):
        raise FileNotFoundError(f"this build has no bundled model file {name}")

    monkeypatch.setattr(controlnet.bundled, "bundled_path", missing)
    assert "no bundled model" in serve_error(capsys) and "--base FILE" in serve_error(capsys)
    assert "--controlnet FILE" in serve_error(capsys, "--base", models[0])


def test_a_bundled_stack_without_its_controlnet_names_the_file(monkeypatch, capsys):
    from controlnet.bundled import BUNDLED_MODELS, BundledModel

    flux = BUNDLED_MODELS["flux"]  # (its base ships; a build may lack the ControlNet)
    monkeypatch.setitem(BUNDLED_MODELS, "flux", BundledModel(flux.base, "no-such-cn.safetensors", "outlines"))
    err = serve_error(capsys, "--family", "flux")
    assert "no-such-cn.safetensors" in err and "--controlnet FILE" in err


def test_bad_model_files_and_settings(capsys, models, tmp_path):
    base, cn, sd2 = models
    assert "does not exist" in serve_error(
        capsys, "--base", str(tmp_path / "nope.safetensors"), "--controlnet", cn
    )
    err = serve_error(capsys, "--base", base, "--controlnet", sd2)
    assert "sd2.safetensors" in err and "base.safetensors" in err  # the mismatch names both files
    assert "limit max_steps must be > 0" in serve_error(
        capsys, "--base", base, "--controlnet", cn, "--max-steps", "0"
    )
    (tmp_path / "vae.safetensors").write_text("not weights")
    err = serve_error(capsys, "--base", base, "--controlnet", cn, "--vae", str(tmp_path / "vae.safetensors"))
    assert "vae.safetensors" in err  # a bad VAE stops the start, naming the file
    (tmp_path / "style.safetensors").write_text("not weights")
    err = serve_error(
        capsys, "--base", base, "--controlnet", cn, "--lora", f"{tmp_path / 'style.safetensors'}:0.5"
    )
    assert "style.safetensors" in err  # so does a bad LoRA
    err = serve_error(
        capsys, "--base", base, "--controlnet", cn, "--annotator-weights", str(tmp_path / "hed.pth")
    )
    assert "annotator weights" in err and "hed.pth" in err  # weights to offer that are not there


def test_a_busy_port_is_a_clear_error(capsys, models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--port", port, "--base", models[0], "--controlnet", models[1]]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
