"""`controlnet generate` from files: models in our format, outputs, replay, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet import Family
from controlnet.cli import main
from controlnet.formats import save_base, save_controlnet
from tiny import make_base, make_controlnet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    base = make_base(Family.SD1)
    save_base(base, d / "base.safetensors")
    save_controlnet(make_controlnet(base.unet, open_zero=True), d / "cn.safetensors")
    sd2 = make_base(Family.SD2)
    save_controlnet(make_controlnet(sd2.unet), d / "cn_sd2.safetensors")
    cond = np.zeros((64, 64, 3), np.uint8)
    cond[20:44, 20:44] = 255
    Image.fromarray(cond).save(d / "cond.png")
    return d


def args(d, *extra):
    return [
        "generate",
        "--base",
        str(d / "base.safetensors"),
        "--controlnet",
        str(d / "cn.safetensors"),
        "--image",
        str(d / "cond.png"),
        "--steps",
        "2",
        "--resolution",
        "64",
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


def test_generate_writes_images_grid_and_a_replayable_sidecar(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            args(
                files,
                "--seed",
                "5",
                "--num-samples",
                "2",
                "--out",
                str(out),
                "--preprocess",
                "canny",
                "--param",
                "low_threshold=50",
            )
        )
        == 0
    )
    sidecar = next(out.glob("*.json"))
    record = json.loads(sidecar.read_text())
    assert record["request"]["seed"] == 5 and record["request"]["controls"][0]["params"] == {
        "low_threshold": 50
    }
    assert len(record["outputs"]["images"]) == 2 and (out / record["outputs"]["grid"]).is_file()
    assert set(record["inputs"]) == {"base", "controls[0].controlnet", "controls[0].image"}
    assert (
        main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    )
    assert "bit-identical" in capsys.readouterr().out
    first = [np.asarray(Image.open(out / i["file"])) for i in record["outputs"]["images"]]
    again = sorted((tmp_path / "again").glob("*_[0-9].png"))
    assert all(np.array_equal(a, np.asarray(Image.open(b))) for a, b in zip(first, again))


def test_region_masks_are_given_per_control_and_recorded(files, tmp_path):
    """--region-mask repeats per control ('none': everywhere); the sidecar records the file it read."""
    region = np.zeros((64, 64), np.uint8)
    region[:, :32] = 255
    Image.fromarray(region).save(tmp_path / "left.png")
    two = ["--image", str(files / "cond.png"), "--seed", "3", "--out", str(tmp_path / "out")]
    assert main(args(files, *two, "--region-mask", str(tmp_path / "left.png"), "--region-mask", "none")) == 0
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert [c["region_mask"] for c in record["request"]["controls"]] == [str(tmp_path / "left.png"), None]
    assert record["inputs"]["controls[0].region_mask"]["path"] == str(tmp_path / "left.png")
    assert "controls[1].region_mask" not in record["inputs"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "steps must be >= 1"),
        (["--strength", "-1"], "control 0: strength must be >= 0"),
        (["--start", "0.9", "--end", "0.1"], "control 0: start 0.9 is after end 0.1"),
        (["--preprocess", "sobel"], "unknown annotator"),
        (["--mask", "x.png"], "a mask needs an init image"),
        (["--param", "3:low=1"], "control index 3 is not one of 0..0"),
        (["--hires-scale", "2", "--hires-upscaler", "esrgan"], "unknown hires upscaler 'esrgan'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, extra, message):
    assert main(args(files, "--out", str(tmp_path / "o"), *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_controlnet_of_another_family_is_refused(files, tmp_path, capsys):
    a = args(files, "--out", str(tmp_path / "o"))
    a[a.index(str(files / "cn.safetensors"))] = str(files / "cn_sd2.safetensors")
    assert main(a) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unreadable_image_and_missing_model(files, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("nope")
    a = args(files, "--out", str(tmp_path / "o"))
    a[a.index(str(files / "cond.png"))] = str(tmp_path / "bad.png")
    assert main(a) == 2 and "cannot read" in capsys.readouterr().err
    b = args(files, "--out", str(tmp_path / "o"))
    b[b.index(str(files / "base.safetensors"))] = str(tmp_path / "none.safetensors")
    assert main(b) == 2 and "does not exist" in capsys.readouterr().err


def test_resize_mode_fits_the_square_map_to_a_tall_output(files, tmp_path):
    out = tmp_path / "out"
    extra = ("--width", "64", "--height", "128", "--resize-mode", "fill", "--seed", "1", "--out", str(out))
    assert main(args(files, *extra)) == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["request"]["resize_mode"] == "fill"
    image = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    grid = np.asarray(Image.open(out / record["outputs"]["grid"]))
    cond_map = grid[4 : 4 + 128, 4 : 4 + 64]  # the grid's first cell, inside its 4 px frame
    assert image.shape == (128, 64, 3)
    assert np.array_equal(cond_map[32:96], np.asarray(Image.open(files / "cond.png")))  # unscaled
    assert not cond_map[:32].any() and not cond_map[96:].any()  # padded above and below


def test_hires_flags_reach_the_request_and_the_image_size(files, tmp_path):
    out = tmp_path / "out"
    extra = (
        "--hires-scale",
        "2",
        "--hires-denoise",
        "0.4",
        "--hires-steps",
        "3",
        "--hires-upscaler",
        "image",
    )
    assert main(args(files, *extra, "--out", str(out))) == 0
    record = json.loads(next(out.glob("*.json")).read_text())["request"]
    assert {k: v for k, v in record.items() if k.startswith("hires")} == {
        "hires_scale": 2.0,
        "hires_denoise": 0.4,
        "hires_steps": 3,
        "hires_upscaler": "image",
    }
    assert np.asarray(Image.open(next(out.glob("*_0.png")))).shape == (128, 128, 3)


def test_the_bundled_model_runs_with_its_own_settings_unless_told_otherwise(files, tmp_path):
    """Without --base the bundled model runs, trained on bare prompts at guidance 1.5: SD's quality
    words, negative prompt and guidance 9 are not its defaults; flags still win; a named base keeps
    SD's defaults."""
    from controlnet.bundled import BUNDLED_GUIDANCE
    from controlnet.generation.request import DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT

    def settings(*extra):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        a = [*extra, "--image", str(files / "cond.png"), "--steps", "1", "--resolution", "64"]
        assert main(["generate", *a, "--quiet", "--device", "cpu", "--out", str(out)]) == 0
        req = json.loads(next(out.glob("*.json")).read_text())["request"]
        return req["guidance"], req["added_prompt"], req["negative_prompt"]

    assert settings() == (BUNDLED_GUIDANCE, "", "")
    assert settings("--guidance", "3", "--added-prompt", "sharp") == (3.0, "sharp", "")
    base = ("--base", str(files / "base.safetensors"), "--controlnet", str(files / "cn.safetensors"))
    assert settings(*base) == (9.0, DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT)
    # the bundled file named by path, or a copy converted in our format, is the same model: the
    # settings travel in its metadata
    from controlnet.bundled import BUNDLED_BASE, BUNDLED_CONTROLNET, bundled_path

    copy = tmp_path / "copy.safetensors"
    assert (
        main(
            [
                "convert",
                str(bundled_path(BUNDLED_BASE)),
                str(copy),
                "--to",
                "controlnet",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    for path in (bundled_path(BUNDLED_BASE), copy):
        named = ("--base", str(path), "--controlnet", str(bundled_path(BUNDLED_CONTROLNET)))
        assert settings(*named) == (BUNDLED_GUIDANCE, "", "")
    # and a model of one's own takes settings the same way
    own = tmp_path / "own.safetensors"
    cmd = ["convert", str(files / "base.safetensors"), str(own), "--to", "controlnet"]
    assert main([*cmd, "--settings", '{"guidance": 4.5, "negative_prompt": "blurry"}']) == 0
    assert settings("--base", str(own), "--controlnet", str(files / "cn.safetensors")) == (
        4.5,
        DEFAULT_ADDED_PROMPT,
        "blurry",
    )


def test_prompt_syntax_flag_reaches_the_sidecar_and_the_images(files, tmp_path):
    outs = {}
    for syntax in ("weighted", "plain"):
        out = tmp_path / syntax
        extra = (
            "--prompt",
            "a (red:1.6) circle",
            "--prompt-syntax",
            syntax,
            "--seed",
            "1",
            "--out",
            str(out),
        )
        assert main(args(files, *extra)) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        assert record["request"]["prompt_syntax"] == syntax
        outs[syntax] = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    assert not np.array_equal(outs["weighted"], outs["plain"])  # the emphasis was read, or not


def test_clip_skip_flag_reaches_the_sidecar_and_the_images(files, tmp_path):
    outs = {}
    for skip in ("1", "2"):
        out = tmp_path / skip
        assert main(args(files, "--clip-skip", skip, "--seed", "1", "--out", str(out))) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        assert record["request"]["clip_skip"] == int(skip)
        outs[skip] = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    assert not np.array_equal(outs["1"], outs["2"])  # another layer of the text encoder was read


def test_vae_flag_decodes_with_that_vae_and_replays(files, tmp_path, capsys):
    from dataclasses import replace

    from controlnet.formats import load_base
    from controlnet.formats.original import VAE, base_tensors
    from tiny import make_vae, released_file

    base = load_base(files / "base.safetensors")
    tensors = base_tensors(replace(base, vae=make_vae(seed=5)))
    vae = released_file(
        tmp_path / "vae.safetensors",
        {k[len(VAE) :]: v for k, v in tensors.items() if k.startswith(VAE)},
        "safetensors",
    )
    images = {}
    for name, extra in (("own", ()), ("other", ("--vae", str(vae)))):
        out = tmp_path / name
        assert main(args(files, "--seed", "2", "--out", str(out), *extra)) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        images[name] = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    assert record["request"]["vae"] == str(vae) and "vae" in record["inputs"]
    assert not np.array_equal(images["own"], images["other"])  # the same latents, decoded otherwise
    sidecar = next((tmp_path / "other").glob("*.json"))
    assert (
        main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    )
    assert "bit-identical" in capsys.readouterr().out
    assert main(args(files, "--out", str(tmp_path / "o"), "--vae", str(tmp_path / "none.pt"))) == 2
    assert "none.pt does not exist" in capsys.readouterr().err


def test_lora_flag_merges_a_lora_and_replays(files, tmp_path, capsys):
    """`--lora FILE:SCALE`: merged into the base for that run (scale 0: the base itself), recorded
    in the sidecar with its file's hash, replayed bit for bit; a bad file fails naming it."""
    import torch
    from safetensors.torch import save_file

    from controlnet.formats import load_base
    from tiny import lora_file

    lora = lora_file(tmp_path / "style.safetensors", load_base(files / "base.safetensors").unet)
    images = {}
    for name, extra in (("none", ()), ("zero", ("--lora", f"{lora}:0")), ("lora", ("--lora", f"{lora}:1.5"))):
        out = tmp_path / name
        assert main(args(files, "--seed", "2", "--out", str(out), *extra)) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        images[name] = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    assert (
        record["request"]["loras"] == [{"path": str(lora), "scale": 1.5}] and "loras[0]" in record["inputs"]
    )
    assert np.array_equal(images["none"], images["zero"])
    assert not np.array_equal(images["none"], images["lora"])
    sidecar = next((tmp_path / "lora").glob("*.json"))
    assert (
        main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    )
    assert "bit-identical" in capsys.readouterr().out
    assert main(args(files, "--out", str(tmp_path / "o"), "--lora", str(tmp_path / "none.safetensors"))) == 2
    assert "LoRA" in (err := capsys.readouterr().err) and "none.safetensors does not exist" in err
    save_file({"conv_in.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    assert main(args(files, "--out", str(tmp_path / "o"), "--lora", str(tmp_path / "bad.safetensors"))) == 2
    assert "bad.safetensors: not a LoRA file" in capsys.readouterr().err


def _frames(folder, names):
    """Square maps whose square moves right frame by frame."""
    folder.mkdir()
    for k, name in enumerate(names):
        frame = np.zeros((64, 64, 3), np.uint8)
        frame[20:44, 4 + 8 * k : 28 + 8 * k] = 255
        Image.fromarray(frame).save(folder / name)
    return folder


def test_a_folder_of_condition_maps_is_a_batch_of_generations(files, tmp_path, capsys):
    frames = _frames(tmp_path / "frames", ["f10.png", "f2.png", "f1.png"])
    (frames / "notes.txt").write_text("not an image: left out")
    out = tmp_path / "out"
    a = [x for x in args(files, "--seed", "3", "--out", str(out)) if x != "--quiet"]
    a[a.index(str(files / "cond.png"))] = str(frames)
    assert main(a) == 0
    captured = capsys.readouterr()
    assert "3 generations" in captured.out and "3/3" in captured.err  # a bar over the items
    assert "f10: 00002-3-f10.json" in captured.err  # and a line per item
    sidecars = sorted(out.glob("*.json"))
    records = [json.loads(p.read_text()) for p in sidecars]
    # natural name order, one shared seed, the frame's name in the output names
    assert [r["request"]["controls"][0]["image"] for r in records] == [
        str(frames / n) for n in ("f1.png", "f2.png", "f10.png")
    ]
    assert {r["request"]["seed"] for r in records} == {3}
    assert [p.name for p in sidecars] == ["00000-3-f1.json", "00001-3-f2.json", "00002-3-f10.json"]
    batch = [np.asarray(Image.open(out / r["outputs"]["images"][0]["file"])) for r in records]
    assert not np.array_equal(batch[0], batch[2])
    # an item is the generation of that frame alone
    single = tmp_path / "single"
    b = args(files, "--seed", "3", "--out", str(single))
    b[b.index(str(files / "cond.png"))] = str(frames / "f2.png")
    assert main(b) == 0
    record = json.loads(next(single.glob("*.json")).read_text())
    assert np.array_equal(np.asarray(Image.open(single / record["outputs"]["images"][0]["file"])), batch[1])
    assert (
        main(["generate", "--from-sidecar", str(sidecars[2]), "--quiet", "--out", str(tmp_path / "r")]) == 0
    )


def test_folders_pair_by_position_and_bad_batches_stop_before_any_work(files, tmp_path, capsys):
    frames = _frames(tmp_path / "frames", ["a.png", "b.png"])
    inits = _frames(tmp_path / "inits", ["x.png", "y.png"])
    out = tmp_path / "out"
    a = args(files, "--seed", "1", "--init-image", str(inits), "--denoise", "0.5", "--out", str(out))
    a[a.index(str(files / "cond.png"))] = str(frames)
    assert main(a) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [(r["request"]["controls"][0]["image"], r["request"]["init_image"]) for r in records] == [
        (str(frames / "a.png"), str(inits / "x.png")),
        (str(frames / "b.png"), str(inits / "y.png")),
    ]

    _frames(tmp_path / "three", ["1.png", "2.png", "3.png"])
    a[a.index(str(inits))] = str(tmp_path / "three")
    a[a.index(str(out))] = str(tmp_path / "o2")
    assert main(a) == 2
    err = capsys.readouterr().err
    assert "different numbers of images" in err and "controls[0].image" in err and "holds 3" in err

    (frames / "c.png").write_text("not pixels")  # one bad frame: refused before the first is made
    a[a.index(str(tmp_path / "three"))] = str(_frames(tmp_path / "inits3", ["x.png", "y.png", "z.png"]))
    assert main(a) == 2
    err = capsys.readouterr().err
    assert "batch item c" in err and "cannot read" in err
    assert not (tmp_path / "o2").exists()

    (tmp_path / "empty").mkdir()
    a[a.index(str(frames))] = str(tmp_path / "empty")
    assert main(a) == 2 and "no images in this folder" in capsys.readouterr().err


def _offered(flag: str) -> tuple[str, ...]:
    """The choices ``controlnet generate --help`` shows for ``flag``."""
    from controlnet.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    return tuple(sub._option_string_actions[flag].metavar.strip("{}").split(","))


def test_sampler_choices_are_the_samplers():
    """--sampler offers exactly the samplers generation knows (derived from the schema's enum)."""
    from controlnet.choices import Sampler

    assert tuple(s.value for s in Sampler) == _offered("--sampler")


def test_timestep_spacing_choices_are_the_spacings():
    from controlnet.choices import TimestepSpacing

    assert tuple(s.value for s in TimestepSpacing) == _offered("--timestep-spacing")


def test_a_control_lora_is_built_on_the_runs_base(files, tmp_path, capsys):
    """`--controlnet` a Control-LoRA: built on the run's base model, LoRAs merged in, so its
    images equal those of the whole ControlNet that `convert --base` makes from that base; the
    run replays bit for bit."""
    from controlnet.formats import load_base, merge_loras, save_base
    from tiny import control_lora_file, lora_file

    base = load_base(files / "base.safetensors")
    clora = control_lora_file(tmp_path / "clora.safetensors", base.unet)
    lora = lora_file(tmp_path / "style.safetensors", base.unet)
    merge_loras(base, [(lora, 1.0)])
    merged = save_base(base, tmp_path / "merged.safetensors")[0]
    images = {}
    for name, base_file, extra in (
        ("plain", files / "base.safetensors", ()),
        ("lora", merged, ("--lora", f"{lora}:1")),
    ):
        whole = tmp_path / f"whole-{name}.safetensors"
        assert main(["convert", str(clora), str(whole), "--to", "controlnet", "--base", str(base_file)]) == 0
        for cn in (clora, whole):
            argv = args(files, "--seed", "2", "--out", str(tmp_path / f"{name}-{cn.stem}"), *extra)
            argv[argv.index("--controlnet") + 1] = str(cn)
            assert main(argv) == 0
            out = tmp_path / f"{name}-{cn.stem}"
            record = json.loads(next(out.glob("*.json")).read_text())
            images[name, cn.stem] = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
        assert np.array_equal(images[name, "clora"], images[name, whole.stem])
    assert not np.array_equal(images["plain", "clora"], images["lora", "clora"])
    sidecar = next((tmp_path / "lora-clora").glob("*.json"))
    assert (
        main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    )
    assert "bit-identical" in capsys.readouterr().out


def test_a_sidecar_written_before_the_request_schema_replays_bit_for_bit(tmp_path, monkeypatch, capsys):
    """tests/data/sidecar-v1 was written by the generation code of 2026-11 (before the request
    became a schema): the bundled model, two controls with windows, modes and a region mask, a
    weighted prompt, euler-a, two samples. Read today, it must ask for exactly the job it recorded:
    its replay equals, bit for bit, the same job typed as today's flags. (Its recorded digests are
    of the machine that wrote it: a CPU of another instruction set differs in the last bits.)"""
    import shutil

    import torch

    fixture = tmp_path / "fixture"
    shutil.copytree(Path(__file__).parent / "data" / "sidecar-v1", fixture)
    monkeypatch.chdir(fixture)  # its image paths are relative, as typed
    recorded = json.loads((fixture / "sidecar.json").read_text())
    typed = ["generate", "--prompt", recorded["request"]["prompt"], "--sampler", "euler-a", "--steps", "6"]
    typed += ["--guidance", "1.5", "--seed", "1234", "--num-samples", "2", "--quiet"]
    typed += ["--image", "outline.png", "--image", "square.png", "--strength", "0.9", "--strength", "0.6"]
    typed += ["--start", "0", "--start", "0.2", "--end", "0.8", "--end", "1", "--mode", "prompt"]
    typed += ["--mode", "controlnet", "--region-mask", "none", "--region-mask", "region.png"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as it was written: a thread count can change the last bit
    try:
        rc = main(["generate", "--from-sidecar", "sidecar.json", "--quiet", "--out", f"{tmp_path}/replay"])
        said = capsys.readouterr().out
        assert main([*typed, "--out", str(tmp_path / "typed")]) == 0
    finally:
        torch.set_num_threads(threads)
    replay, today = (json.loads(next((tmp_path / d).glob("*.json")).read_text()) for d in ("replay", "typed"))

    def digests(record):
        return [i["sha256"] for i in record["outputs"]["images"]]

    same = digests(recorded) == digests(replay)
    assert ("bit-identical" in said and rc == 0) if same else ("differ from the recorded" in said and rc == 1)
    assert digests(replay) == digests(today) and replay["request"] == today["request"]


def test_a_replay_that_differs_names_what_differs_in_the_environment(files, tmp_path, capsys):
    """Each sidecar records what decides the last bits besides the request (library versions, the
    CPU's instruction set and thread count); a replay whose images differ names what changed."""
    import torch

    sidecar = _one_run(files, tmp_path / "out")
    record = json.loads(sidecar.read_text())
    env = record["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu_threads"] >= 1
    assert {"torch", "numpy", "pillow", "python", "device"} <= set(env)
    env["cpu_capability"] = "an older CPU"
    record["outputs"]["images"][0]["sha256"] = "0" * 64  # as another machine would have written
    sidecar.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(sidecar), "--quiet", "--out", f"{tmp_path}/x"]) == 1
    said = capsys.readouterr().out
    assert f"cpu_capability: an older CPU -> {torch.backends.cpu.get_cpu_capability()}" in said


def _one_run(files, out, *extra):
    assert main(args(files, "--seed", "5", "--out", str(out), *extra)) == 0
    return next(out.glob("*.json"))


def _images(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*_[0-9].png"))]


def test_a_replay_works_from_any_folder_and_checks_what_it_reads(files, tmp_path, monkeypatch, capsys):
    """Paths typed relative to the working folder are recorded so that a replay from elsewhere
    reads the same files; a control image path edited in the sidecar, or a file with no recorded
    digest, is refused before any work."""
    monkeypatch.chdir(files)
    sidecar = _one_run(files, tmp_path / "out", "--image", "cond.png")  # relative, as typed
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", "again", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out

    record = json.loads(sidecar.read_text())
    other = tmp_path / "other.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(other)
    edited = tmp_path / "edited.json"
    record["request"]["controls"][0]["image"] = str(other)
    edited.write_text(json.dumps(record))
    assert main(["generate", "--from-sidecar", str(edited), "--out", "x", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "controls[0].image" in err and "has changed" in err and len(err.splitlines()) == 1

    record = json.loads(sidecar.read_text())
    del record["inputs"]
    edited.write_text(json.dumps(record))
    assert main(["generate", "--from-sidecar", str(edited), "--out", "x", "--quiet"]) == 2
    assert "has no recorded digest" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_replay_applies_the_flags_given_and_records_them(files, tmp_path, capsys):
    """--from-sidecar with --seed (or a per-control flag) runs the recorded request with that
    change, which the new sidecar records; a flag for controls the run did not have is refused."""
    sidecar = _one_run(files, tmp_path / "out")
    capsys.readouterr()
    again = tmp_path / "again"
    cmd = ["generate", "--from-sidecar", str(sidecar), "--out", str(again), "--quiet"]
    assert main([*cmd, "--seed", "9", "--strength", "0.5"]) == 0
    assert "with --seed, --strength changed" in capsys.readouterr().out
    new = json.loads(next(again.glob("*.json")).read_text())["request"]
    assert new["seed"] == 9 and new["controls"][0]["strength"] == 0.5 and new["steps"] == 2
    direct = tmp_path / "direct"
    assert main(args(files, "--seed", "9", "--strength", "0.5", "--out", str(direct))) == 0
    assert all(np.array_equal(a, b) for a, b in zip(_images(again), _images(direct), strict=True))

    plain = _one_run(files, tmp_path / "plain", "--image", str(files / "cond.png"))
    record = json.loads(plain.read_text())
    record["request"]["controls"] = []
    record["inputs"] = {k: v for k, v in record["inputs"].items() if not k.startswith("controls")}
    (tmp_path / "none.json").write_text(json.dumps(record))
    rc = main(["generate", "--from-sidecar", str(tmp_path / "none.json"), "--strength", "2", "--quiet"])
    assert rc == 2 and "--strength: the recorded generation has no controls" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"steps": "many"}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"controls": [{"strength": 1.0}]}, "image"),
        ({"guidance": float("nan")}, "guidance"),
        ({"num_samples": 1_000_000}, "num_samples"),
    ],
)
def test_a_malformed_sidecar_is_one_line(files, tmp_path, capsys, change, words):
    sidecar = _one_run(files, tmp_path / "out")
    record = json.loads(sidecar.read_text())
    record["request"].update(change)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["generate", "--from-sidecar", str(bad), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and str(bad) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_sidecar_nested_deep_or_not_json_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": "controlnet-generation/2", "request": ' + "[" * 50_000 + "]" * 50_000 + "}")
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for path in (deep, folder):
        assert main(["generate", "--from-sidecar", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert str(path) in err and len(err.splitlines()) == 1


def test_a_param_without_an_annotator_is_refused(files, tmp_path, capsys):
    assert main(args(files, "--param", "low_threshold=50", "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "--param low_threshold: control 0 has no annotator" in err and "--preprocess" in err


def test_a_replay_finds_moved_models_by_flag_and_still_checks_them(files, tmp_path, capsys):
    """Models moved (or named by a server's sidecar) are given again by flag: the same content,
    wherever it lies, replays bit for bit."""
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    for name in ("base.safetensors", "cn.safetensors"):
        shutil.copy(files / name, models / name)
    shutil.copy(files / "cond.png", tmp_path / "cond.png")
    run = args(models, "--seed", "5", "--out", str(tmp_path / "out"))
    run[run.index("--image") + 1] = str(tmp_path / "cond.png")
    assert main(run) == 0
    sidecar = next((tmp_path / "out").glob("*.json"))
    moved = tmp_path / "moved"
    models.rename(moved)
    capsys.readouterr()
    cmd = ["generate", "--from-sidecar", str(sidecar), "--quiet", "--out", str(tmp_path / "r")]
    assert main(cmd) == 2 and "base" in capsys.readouterr().err
    relocated = ["--base", str(moved / "base.safetensors"), "--controlnet", str(moved / "cn.safetensors")]
    assert main([*cmd, *relocated]) == 0
    assert "bit-identical" in capsys.readouterr().out
    other = ["--base", str(moved / "base.safetensors"), "--controlnet", str(files / "cn.safetensors")]
    assert main([*cmd, *other]) == 0  # the same bytes, by another path: still the same run
    assert "bit-identical" in capsys.readouterr().out


def test_true_guidance_is_for_guidance_distilled_models_only(tmp_path, capsys):
    """The bundled model takes classifier-free guidance as `guidance`; `--true-guidance` is refused
    naming the field."""
    image = tmp_path / "c.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    argv = [
        "generate",
        "--image",
        str(image),
        "--steps",
        "1",
        "--true-guidance",
        "2",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "true_guidance: only a guidance-distilled model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_family_takes_a_bundled_stacks_files_where_none_are_given(files, tmp_path, monkeypatch, capsys):
    """--family flux: the bundled transformer base (here with a fresh ControlNet of its
    architecture given by --controlnet: the trained one ships later) at the side and with the
    sampler it was made for; the sidecar names the file used. A build without the stack's
    ControlNet names that file in one line."""
    from controlnet.bundled import BUNDLED_MODELS, BundledModel, bundled_path
    from controlnet.formats import load_base
    from controlnet.training.recipes import architecture

    flux = BUNDLED_MODELS["flux"]
    base = load_base(bundled_path(flux.base))
    save_controlnet(base.new_controlnet(architecture("flux-tiny")["controlnet"]), tmp_path / "cn.safetensors")
    a = ["generate", "--family", "flux", "--image", str(files / "cond.png"), "--steps", "1", "--quiet"]
    out = tmp_path / "out"
    assert main([*a, "--controlnet", str(tmp_path / "cn.safetensors"), "--out", str(out)]) == 0
    request = json.loads(next(out.glob("*.json")).read_text())["request"]
    assert Path(request["base"]) == bundled_path(flux.base) and request["sampler"] == "euler"
    assert np.asarray(Image.open(next(out.glob("*_0.png")))).shape == (128, 128, 3)
    replay = ["generate", "--from-sidecar", str(next(out.glob("*.json"))), "--family", "unet", "--quiet"]
    assert main([*replay, "--out", str(tmp_path / "replay")]) == 2  # a replay's models are its sidecar's
    assert "--family: a replay runs the models its sidecar names" in capsys.readouterr().err
    assert not (tmp_path / "replay").exists()

    monkeypatch.setitem(BUNDLED_MODELS, "flux", BundledModel(flux.base, "no-such-cn.safetensors", "outlines"))
    assert main([*a, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-cn.safetensors" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()
