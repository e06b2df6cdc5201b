"""`controlnet data` -> `train --objective vae|base|controlnet` -> `eval`: the chain that built the
bundled model, at smoke scale on the CPU; and train's bad input."""

import json

import pytest
import torch

from controlnet import Family
from controlnet.cli import main
from controlnet.formats import load_base, load_controlnet, save_base, save_controlnet
from tiny import make_base, make_controlnet

COMMON = [
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--lr",
    "1e-3",
    "--cpu",
    "--quiet",
    "--log-every",
    "2",
    "--validate-every",
    "2",
    "--validation-count",
    "4",
    "--validation-steps",
    "2",
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    assert main(["data", "fill50k", "--out", str(d / "data"), "--n", "40", "--size", "64", "--quiet"]) == 0
    assert (
        main(
            [
                "train",
                "--objective",
                "vae",
                "--arch",
                "fill50k-tiny",
                "--data",
                str(d / "data"),
                "--out",
                str(d / "vae"),
                *COMMON,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--objective",
                "base",
                "--base",
                str(d / "vae/final/base.safetensors"),
                "--data",
                str(d / "data"),
                "--out",
                str(d / "base"),
                *COMMON,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--base",
                str(d / "base/final/base.safetensors"),
                "--arch",
                "fill50k-tiny",
                "--data",
                str(d / "data"),
                "--out",
                str(d / "cn"),
                "--cache",
                str(d / "cache"),
                "--ema-decay",
                "0.9",
                "--score-name",
                "iou",
                "--score-threshold",
                "0",
                *COMMON,
            ]
        )
        == 0
    )
    return d


def test_each_stage_exports_a_loadable_model(chain):
    vae_stage = load_base(chain / "vae/final/base.safetensors")
    assert vae_stage.latent_scale != 1.0  # the VAE stage measured its latent scaling
    base = load_base(chain / "base/final/base.safetensors")
    assert base.latent_scale == vae_stage.latent_scale
    cn = load_controlnet(chain / "cn/final/controlnet.safetensors")
    assert cn.config.hint_block_channels == (16, 32, 96, 256)
    run = json.loads((chain / "cn/run.json").read_text())
    assert run["converged_at"] == 2 and run["steps"] == 4
    assert sorted(p.name for p in (chain / "cn/samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    assert (chain / "cn/scores.png").is_file() and (chain / "base/samples/step-00000004.png").is_file()


def test_eval_writes_a_report(chain, tmp_path):
    args = [
        "eval",
        "--data",
        str(chain / "data"),
        "--out",
        str(tmp_path / "ev"),
        "--n",
        "4",
        "--steps",
        "2",
        "--batch",
        "2",
        "--quiet",
        "--base",
        str(chain / "base/final/base.safetensors"),
    ]
    assert main([*args, "--controlnet", str(chain / "cn/final/controlnet.safetensors")]) == 0
    res = json.loads((tmp_path / "ev/results.json").read_text())
    assert len(res["per_sample"]) == 4 and 0 <= res["summary"]["iou"] <= 1
    assert 0 <= res["summary"]["colour_accuracy"] <= 1 and (tmp_path / "ev/examples.png").is_file()
    assert main([*args, "--no-controlnet", "--out", str(tmp_path / "ev2")]) == 0
    assert "free_colour_ok" in json.loads((tmp_path / "ev2/results.json").read_text())["summary"]
    assert res["config"]["guidance"] == 9.0  # a named base: SD's default


def test_eval_reconstruct_scores_the_bases_vae_alone(chain, tmp_path, capsys):
    base = chain / "base/final/base.safetensors"
    args = [
        "eval",
        "--data",
        str(chain / "data"),
        "--n",
        "3",
        "--base",
        str(base),
        "--quiet",
        "--reconstruct",
    ]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev/results.json").read_text())
    assert res["config"]["reconstruct"] is True and len(res["per_sample"]) == 3
    assert 0 <= res["summary"]["iou"] <= 1 and "round trip" in (tmp_path / "ev/results.md").read_text()
    capsys.readouterr()
    cn = ["--controlnet", str(chain / "cn/final/controlnet.safetensors"), "--out", str(tmp_path / "ev2")]
    assert main([*args, *cn]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--reconstruct" in err and "--controlnet" in err
    assert not (tmp_path / "ev2").exists()


def test_train_and_eval_build_a_control_lora_on_their_base(chain, tmp_path):
    """A Control-LoRA (low-rank changes to a base UNet) given to `train --init-controlnet` or to
    `eval --controlnet` is built on that command's --base: training starts from the same weights,
    and eval scores the same images, as with the file converted whole."""
    from tiny import control_lora_file

    base = chain / "base/final/base.safetensors"
    clora = control_lora_file(tmp_path / "clora.safetensors", load_base(base).unet, seed=5)
    whole = load_controlnet(clora, base_unet=load_base(base).unet)
    save_controlnet(whole, tmp_path / "whole.safetensors")

    data = ["--data", str(chain / "data"), "--base", str(base)]
    ev = ["eval", *data, "--n", "2", "--steps", "2", "--batch", "2", "--quiet"]
    scores = []
    for cn in ("clora", "whole"):
        assert (
            main([*ev, "--controlnet", str(tmp_path / f"{cn}.safetensors"), "--out", str(tmp_path / cn)]) == 0
        )
        scores.append(json.loads((tmp_path / cn / "results.json").read_text())["per_sample"])
    assert scores[0] == scores[1]

    # one step at a learning rate too small to move a float32 weight: the run's export is its start
    args = [
        "train",
        *data,
        "--init-controlnet",
        str(clora),
        "--out",
        str(tmp_path / "run"),
        "--cpu",
        "--quiet",
    ]
    assert main([*args, "--steps", "1", "--batch-size", "8", "--lr", "1e-30"]) == 0
    started = load_controlnet(tmp_path / "run/final/controlnet.safetensors").state_dict()
    expected = whole.state_dict()
    assert started.keys() == expected.keys()
    for key, t in expected.items():
        torch.testing.assert_close(started[key], t, rtol=0, atol=1e-20, msg=key)


def test_eval_of_the_bundled_model_uses_its_guidance(chain, tmp_path):
    from controlnet.bundled import BUNDLED_GUIDANCE

    args = ["eval", "--data", str(chain / "data"), "--n", "2", "--steps", "1", "--batch", "2", "--quiet"]
    for extra, guidance in (([], BUNDLED_GUIDANCE), (["--guidance", "4"], 4.0)):
        out = tmp_path / f"g{guidance}"
        assert main([*args, *extra, "--out", str(out)]) == 0
        assert json.loads((out / "results.json").read_text())["config"]["guidance"] == guidance


def test_train_bad_input(tmp_path, capsys, chain):
    sd2 = make_base(Family.SD2)
    data, sd1 = ["--data", str(chain / "data")], ["--base", str(tmp_path / "sd1.safetensors")]
    save_controlnet(make_controlnet(sd2.unet), tmp_path / "sd2cn.safetensors")
    save_base(make_base(Family.SD1), tmp_path / "sd1.safetensors")
    cases = [
        (["--data", str(tmp_path / "nothing"), "--base", str(tmp_path / "sd1.safetensors")], "nothing"),
        (
            [
                "--data",
                str(chain / "data"),
                "--base",
                str(tmp_path / "sd1.safetensors"),
                "--init-controlnet",
                str(tmp_path / "sd2cn.safetensors"),
            ],
            "does not fit",
        ),
        (["--data", str(chain / "data")], "give a base model (--base)"),
        (["--data", str(chain / "data"), "--objective", "vae", "--arch", "nope"], "no architecture 'nope'"),
        (
            ["--data", str(chain / "data"), "--base", str(tmp_path / "sd1.safetensors"), "--export", "onnx"],
            "unknown export format",
        ),
        (
            [*data, "--objective", "vae", "--arch", "fill50k-tiny", "--noise-offset", "0.1"],
            "the 'vae' objective adds no noise",
        ),
        (
            [*data, *sd1, "--noise-offset", "-1"],
            "noise offset must be >= 0",
        ),
        # settings checked by the training loop are named by their flags, not their Python names
        ([*data, *sd1, "--compile-mode", "max"], "--compile-mode must be one of"),
        ([*data, *sd1, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ([*data, *sd1, "--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
        ([*data, *sd1, "--lr", "nan"], "learning rates must be > 0, got --lr=nan, --decoder-lr="),
        ([*data, *sd1, "--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
        (
            [*data, *sd1, "--objective", "adapter", "--init-controlnet", str(tmp_path / "sd2cn.safetensors")],
            "a ControlNet, not what --objective adapter trains",
        ),
        (  # a hint encoder that halves the condition twice, on a base whose VAE does three times
            [*data, *sd1, "--controlnet-config", '{"hint_block_channels": [4, 8, 16]}'],
            "--controlnet-config's hint encoder scales the condition down 4x, but "
            f"{tmp_path / 'sd1.safetensors'}'s VAE 8x",
        ),
    ]
    for extra, message in cases:
        assert main(["train", "--out", str(tmp_path / "run"), *COMMON, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_t2i_adapter_trains_on_the_same_data_and_exports_in_its_layouts(chain, tmp_path):
    """`train --objective adapter`: a fresh T2I-Adapter for the base's UNet, trained with the same
    loss on the same (cached) data, the base untouched; exported as our file and a diffusers
    folder that load as the adapter trained, validated and evaluated like a ControlNet."""
    from controlnet.families.sd.adapter import T2IAdapter

    base_file = chain / "base/final/base.safetensors"
    run = tmp_path / "adapter"
    args = ["train", "--objective", "adapter", "--base", str(base_file), "--data", str(chain / "data")]
    args += [
        "--out",
        str(run),
        "--cache",
        str(chain / "cache"),
        "--export",
        "controlnet,diffusers",
    ]
    assert main([*args, *COMMON]) == 0
    ours, folder = (
        load_controlnet(run / "final/adapter.safetensors"),
        load_controlnet(run / "final/adapter-diffusers"),
    )
    assert isinstance(ours, T2IAdapter) and ours.config.adapter_type == "full_adapter"
    assert ours.config.channels == list(load_base(base_file).unet.config.block_out_channels)
    trained = ours.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in folder.state_dict().items())
    torch.manual_seed(0)  # the run's seed: the fresh adapter it started from
    fresh = T2IAdapter(ours.config).state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)  # it trained
    assert (run / "samples/step-00000004.png").is_file() and (run / "scores.png").is_file()
    ev = ["eval", "--data", str(chain / "data"), "--out", str(tmp_path / "ev"), "--n", "4", "--steps", "2"]
    ev += [
        "--batch",
        "2",
        "--quiet",
        "--base",
        str(base_file),
        "--controlnet",
        str(run / "final/adapter.safetensors"),
    ]
    assert main(ev) == 0
    assert 0 <= json.loads((tmp_path / "ev/results.json").read_text())["summary"]["iou"] <= 1


def test_a_fresh_sdxl_adapter_fits_its_unet_and_takes_gradients():
    """SDXL's kind for an SDXL UNet: its features enter the encoder's levels, and the loss's
    gradient reaches every adapter weight (the UNet locked)."""
    from controlnet.families.sd.adapter import T2IAdapter

    base = make_base(Family.SDXL)
    adapter = T2IAdapter.for_unet(dict(base.unet.config), latent_factor=base.vae_scale_factor)
    assert adapter.config.adapter_type == "full_adapter_xl"
    base.check_controlnet(adapter, controlnet_name="adapter", base_name="base")
    model = base.controlled(adapter)
    h = base.latent_size((base.native_size,) * 2)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, *h, generator=g)
    context = torch.randn(2, 6, base.unet.config.cross_attention_dim, generator=g)
    pooled = (
        base.unet.config.projection_class_embeddings_input_dim - 6 * base.unet.config.addition_time_embed_dim
    )
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.ones(2, 6)}
    cond = torch.rand(2, 3, base.native_size, base.native_size, generator=g)
    model(sample, torch.tensor([10, 500]), context, cond, added_cond_kwargs=added).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in base.unet.parameters())


def test_train_reports_captions_the_text_window_cuts(chain, tmp_path, capsys):
    """Training reads a caption as one 75-token window: longer ones are counted before the run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(chain / "data", data)
    rows = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines()]
    # "detail", the digits (CLIP reads one digit a token) and a comma: 60 x 3 + 50 - 1 = 229 tokens
    long_caption = ", ".join(f"detail {i}" for i in range(60))
    rows[0]["prompt"] = long_caption
    rows[1]["prompt"] = long_caption  # the same caption twice counts once
    rows[2]["prompt"] = "word " * 75  # exactly the window: not cut
    (data / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_base(make_base(Family.SD1), tmp_path / "sd1.safetensors")
    args = ["train", "--objective", "base", "--base", str(tmp_path / "sd1.safetensors"), "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "run"), *COMMON, "--steps", "1"]) == 0
    out = capsys.readouterr().out
    distinct = len({r["prompt"] for r in rows})
    said = f"1 of {distinct} distinct captions in {data} are longer than CLIP's 75 tokens; CLIP reads"
    assert said in out
    assert "the longest, 229 tokens: 'detail 0, detail 1," in out


def test_train_starts_from_its_seed_and_keeps_earlier_runs(chain, tmp_path, capsys):
    """The fresh ControlNet's new layers come from --seed (two runs of one seed start alike, of
    another seed not); a second run into a used folder is refused unless --overwrite."""
    args = ["train", "--base", str(chain / "base/final/base.safetensors"), "--arch", "fill50k-tiny"]
    args += ["--data", str(chain / "data"), *COMMON, "--steps", "1", "--validation-count", "0"]
    args += ["--export", "controlnet"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main([*args, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    a, b, c = (load_controlnet(tmp_path / n / "final" / "controlnet.safetensors").state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    capsys.readouterr()
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier training run" in err and len(err.strip().splitlines()) == 1, err
    a_again = load_controlnet(tmp_path / "a" / "final" / "controlnet.safetensors").state_dict()
    assert all(torch.equal(a[k], a_again[k]) for k in a)  # the refused run touched nothing
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    a_new = load_controlnet(tmp_path / "a" / "final" / "controlnet.safetensors").state_dict()
    assert all(torch.equal(c[k], a_new[k]) for k in c)


def test_resume_reads_the_runs_settings_and_refuses_other_ones(chain, tmp_path, capsys):
    """`train --out RUN --resume --steps N` continues RUN with the settings its run.json records
    (no flag repeated) and ends bit for bit where an uninterrupted run ends; a setting given that
    differs from the recorded one is refused by flag, before any work."""
    args = ["train", "--base", str(chain / "base/final/base.safetensors"), "--arch", "fill50k-tiny"]
    args += ["--data", str(chain / "data"), *COMMON, "--validation-count", "0", "--seed", "3"]
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "part")]) == 0
    capsys.readouterr()
    resume = ["train", "--out", str(tmp_path / "part"), "--resume"]
    assert main([*resume, "--steps", "4", "--lr", "1e-2"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run has 0.001)" in err and len(err.strip().splitlines()) == 1, err
    assert main([*resume, "--steps", "4", "--quiet", "--cpu"]) == 0
    whole, part = (
        load_controlnet(tmp_path / n / "final" / "controlnet.safetensors").state_dict()
        for n in ("whole", "part")
    )
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    assert json.loads((tmp_path / "part" / "run.json").read_text())["config"]["steps"] == 4
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no run.json, so no run to resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), *COMMON]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_the_cache_reads_the_images_with_the_runs_workers(chain, tmp_path, monkeypatch):
    """--num-workers serves the latent cache's build as it serves the training loader (a cache
    was read by the main process alone: about 0.9 ms an outlines item on a CPU core, 90 s for the
    100,000 of flux-tiny's training set)."""
    import controlnet.data

    seen = []
    real = controlnet.data.build_cache

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(controlnet.data, "build_cache", spy)
    base = str(chain / "base/final/base.safetensors")
    args = ["train", "--base", base, "--data", str(chain / "data"), "--out", str(tmp_path / "run")]
    assert main([*args, "--cache", str(tmp_path / "cache"), "--num-workers", "2", *COMMON]) == 0
    assert seen == [2]


@pytest.mark.parametrize("cpu", [True, False], ids=["--cpu", "no-flag"])
def test_train_under_a_launcher_runs_once_per_process_and_reports_once(chain, tmp_path, cpu):
    """`torchrun ... -m controlnet.cli train` with two CPU processes and a latent cache: process 0
    builds the cache while the other waits (then finds it built), they train one run of the
    global batch, and the run is reported once; on a machine without CUDA also without --cpu
    (accelerate ran each process alone then, two runs racing in one folder)."""
    from launch import two_processes

    base = str(chain / "base/final/base.safetensors")
    run, cache = tmp_path / "run", tmp_path / "cache"
    train = ["-m", "controlnet.cli", "train", "--base", base, "--data", str(chain / "data")]
    flags = COMMON if cpu else [f for f in COMMON if f != "--cpu"]
    done = two_processes(*train, "--out", str(run), "--cache", str(cache), *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps (64 samples)") == 1  # batch 8 x 2 processes x 4 steps
    assert done.stdout.count("exported ") == 1
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["global_batch"] == 16
    assert json.loads((cache / "cache.json").read_text())["count"] == 40
    assert not list(tmp_path.glob(".cache.*"))  # no builder's leftovers
