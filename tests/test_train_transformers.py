"""Training transformer ControlNets (Flux.1, SD3): the flow-matching objective with each family's
level draw and shift, a fresh ControlNet that leaves the base exactly as it was, gradients that
reach only the ControlNet, and `controlnet train` end to end on tiny files: validation scored on
the outlines world, an export that generates, a cache, and a resume that ends bit for bit where an
uninterrupted run ends."""

import csv
import json

import pytest
import torch

from controlnet.cli import main
from controlnet.data.outlines import generate_outlines
from controlnet.families import load_controlnet
from controlnet.families.flow_match import FlowMatchTraining
from controlnet.families.flux.schedule import FLUX_SCHEDULE
from controlnet.formats import save_base
from controlnet.imageio import read_image
from controlnet.training.objectives import ControlNetObjective, StepNoise
from test_sd3_generate import sd3_base
from tiny_flux import tiny_flux_base

QUIET = ["--cpu", "--quiet", "--batch-size", "2", "--lr", "1e-3", "--validation-steps", "2"]


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_base()


@pytest.fixture(scope="module")
def files(tmp_path_factory, flux):
    d = tmp_path_factory.mktemp("dit")
    save_base(flux, d / "flux.safetensors")
    save_base(sd3_base(), d / "sd3.safetensors")
    generate_outlines(d / "data", 10, size=32, seed=0, max_shapes=2, workers=1, progress=False)
    return d


def test_levels_follow_each_familys_shift():
    normal = torch.linspace(-3, 3, 7)
    sd3 = FlowMatchTraining({"shift": 3.0}).levels(torch.zeros(1), (8, 8))
    assert sd3.item() == pytest.approx(0.75)  # u = 1/2 shifted by 3: 3u / (1 + 2u)
    flux = FlowMatchTraining(FLUX_SCHEDULE)
    small, large = flux.levels(normal, (16, 16)), flux.levels(normal, (128, 128))
    assert ((small > 0) & (small < 1)).all() and (torch.diff(small) > 0).all()
    assert (large > small).all()  # more tokens, a larger shift towards noise (as Flux.1 samples)
    x, e = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy, t, target = FlowMatchTraining({"shift": 1.0}).noised(x, e, torch.tensor([-1.0, 0.0, 2.0]))
    s = torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.allclose(t, 1000 * s)
    sb = s.view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - sb) * x + sb * e, atol=1e-6)  # (s drawn in float64)
    assert torch.equal(target, e - x)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_fresh_controlnet_leaves_the_base_exact_and_only_it_learns(family, flux):
    base = flux if family == "flux" else sd3_base()
    config = {"num_layers": 1, "num_single_layers": 1} if family == "flux" else {"num_layers": 1}
    objective = ControlNetObjective(base, base.new_controlnet(config), empty_prompt_prob=0.0)
    x = torch.randn(2, base.latent_channels, 8, 8)
    t = torch.tensor([300.0, 800.0])
    emb = base.encode_prompt(["red circle", "blue star"])
    added = dict(emb.added or {})
    if base.guidance_input:
        added["guidance"] = torch.full((2,), base.training_guidance())
    alone = base.predict(x, t, emb.context, added=added)
    with torch.no_grad():
        controlled = objective.model(x, t, emb.context, torch.rand(2, 3, 16, 16), added_cond_kwargs=emb.added)
    assert torch.equal(controlled, alone)  # zero-initialised outputs: exactly the base

    batch = {
        "target": torch.rand(2, 3, 32, 32) * 2 - 1,
        "cond": torch.rand(2, 3, 32, 32),
        "prompt": ["a", "b"],
    }
    loss = objective(batch, StepNoise(0, 0, 0, 2, slice(0, 2), "cpu"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in base.transformer.parameters())
    # the zero output layers learn from the first step (the paper's argument: their input is not
    # zero); what lies behind them waits for them to open
    outputs = [
        p for n, p in objective.controlnet.named_parameters() if n.startswith("controlnet_") and "blocks" in n
    ]
    assert outputs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in outputs)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_train_validates_on_outlines_exports_and_generates(family, files, tmp_path, capsys):
    """In bf16 mixed precision, as on a GPU: the validation samples run the float32 ControlNet
    beside the bf16 base."""
    config = '{"num_layers": 1, "num_single_layers": 1}' if family == "flux" else '{"num_layers": 1}'
    run = tmp_path / "run"
    args = ["train", "--base", str(files / f"{family}.safetensors"), "--data", str(files / "data")]
    args += [
        "--controlnet-config",
        config,
        "--steps",
        "2",
        "--validate-every",
        "2",
        "--validation-count",
        "2",
        "--mixed-precision",
        "bfloat16",
    ]
    assert main([*args, *QUIET, "--out", str(run)]) == 0
    metrics = (run / "metrics.csv").read_text()
    assert "score/shape_iou" in metrics and "val_loss" in metrics
    assert (run / "samples" / "step-00000002.png").is_file()
    cn = load_controlnet(run / "final" / "controlnet.safetensors")
    assert cn.num_residuals == (2 if family == "flux" else 1)
    out = tmp_path / "out"
    gen = ["generate", "--base", str(files / f"{family}.safetensors"), "--controlnet"]
    gen += [str(run / "final" / "controlnet.safetensors"), "--image", str(files / "data/source/0.png")]
    gen += ["--prompt", "red circle with blue background", "--steps", "2", "--width", "64", "--height", "64"]
    assert main([*gen, "--out", str(out)]) == 0 and len(list(out.glob("*.png"))) >= 1
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["request"]["sampler"] == "euler"


def test_flux_resume_and_cache_end_where_a_whole_run_ends(files, tmp_path, capsys):
    args = ["train", "--base", str(files / "flux.safetensors"), "--data", str(files / "data"), *QUIET]
    args += ["--controlnet-config", '{"num_layers": 1}', "--validation-count", "0", "--seed", "5"]
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "part")]) == 0
    assert (
        main(["train", "--out", str(tmp_path / "part"), "--resume", "--steps", "4", "--quiet", "--cpu"]) == 0
    )
    whole, part = (
        load_controlnet(tmp_path / n / "final" / "controlnet.safetensors").state_dict()
        for n in ("whole", "part")
    )
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    cached = [*args, "--steps", "2", "--out", str(tmp_path / "cached"), "--cache", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main(cached) == 0
    assert "caching" not in capsys.readouterr().err  # --quiet: no progress bar while it caches either
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cache" / "embeds.safetensors"), "pt") as f:
        assert {"context", "pooled", "empty_context", "empty_pooled"} <= set(f.keys())


def test_a_union_controlnet_trains_on_the_datas_mode(files, tmp_path):
    args = ["train", "--base", str(files / "flux.safetensors"), "--data", str(files / "data"), *QUIET]
    args += ["--controlnet-config", '{"num_layers": 1, "num_mode": 3}', "--control-mode", "2"]
    assert (
        main(
            [
                *args,
                "--steps",
                "2",
                "--validate-every",
                "2",
                "--validation-count",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    cn = load_controlnet(tmp_path / "final" / "controlnet.safetensors")
    assert cn.config.num_mode == 3 and (tmp_path / "samples" / "step-00000002.png").is_file()
    assert json.loads((tmp_path / "run.json").read_text())["config"]["extra"]["spec"]["control_mode"] == 2


def test_transformer_training_refuses_what_does_not_apply(files, tmp_path, capsys):
    base = ["train", "--base", str(files / "flux.safetensors"), "--data", str(files / "data"), *QUIET]
    cases = [
        (["--controlnet-config", '{"num_blocks": 2}'], "num_blocks is not a field of a Flux ControlNet"),
        (["--controlnet-config", "[1]"], "--controlnet-config: expected a JSON object"),
        (["--only-mid-control"], "a transformer has no middle block"),
        (["--no-sd-locked"], "--no-sd-locked: a transformer base stays locked"),
        (
            ["--controlnet-config", '{"num_mode": 3}'],
            "this Union ControlNet has 3 modes; give the data's, 0-2",
        ),
        (["--controlnet-config", '{"num_mode": 3}', "--control-mode", "3"], "0-2 (got 3)"),
        (["--control-mode", "1"], "--control-mode 1: the ControlNet is not a Union ControlNet"),
    ]
    odd = generate_outlines(tmp_path / "odd", 2, size=34, seed=0, workers=1, progress=False)
    cases.append((["--data", str(odd)], "odd: this model's image sides are multiples of 4 px, got 34x34"))
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"r{i}"
        assert main([*base, *extra, "--steps", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # nothing written


def test_a_flux_style_stack_trains_from_scratch_with_our_commands(tmp_path):
    """The path of a bundled transformer model: a fresh Flux-style stack (`--arch flux-tiny`: its
    T5 reads characters), its VAE (latent shift and scale measured on the data), its transformer
    by flow matching, a ControlNet on it, and a generation from the files."""
    from controlnet.families import load_base

    data = generate_outlines(tmp_path / "data", 8, size=32, seed=0, max_shapes=2, workers=1, progress=False)
    common = ["--data", str(data), *QUIET, "--steps", "2", "--validate-every", "2", "--validation-count", "2"]
    vae = ["train", "--objective", "vae", "--arch", "flux-tiny", "--out", str(tmp_path / "vae")]
    assert main([*vae, *common]) == 0
    stage1 = load_base(tmp_path / "vae/final/base.safetensors")
    assert stage1.vae.config.shift_factor != 0.0 and stage1.vae.config.scaling_factor != 1.0
    assert stage1.tokenizer_2.tokenize("Gold")[:5] == ["▁", "g", "o", "l", "d"]
    # its validation scores the reconstructions of the last 2 items as outputs: the VAE's ceiling
    from controlnet.data import open_dataset
    from controlnet.evaluation.evaluate import outlines_scorer, round_trip

    with open(tmp_path / "vae/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["name"].startswith("score/")]
    logged = {r["name"][6:]: float(r["value"]) for r in rows}
    dataset = open_dataset(data)
    items = [dataset[i] for i in (6, 7)]
    rebuilt = round_trip(stage1, torch.stack([it["target"] for it in items]))
    expected = outlines_scorer(dataset)(rebuilt, items)
    assert {"psnr_db", "iou", "shape_iou", "colour_accuracy"} <= logged.keys()
    for k in ("iou", "shape_iou", "colour_accuracy"):
        assert logged[k] == pytest.approx(expected[k], abs=0.02), k
    base = ["train", "--objective", "base", "--base", str(tmp_path / "vae/final/base.safetensors")]
    assert main([*base, "--out", str(tmp_path / "base"), *common]) == 0
    stage2 = load_base(tmp_path / "base/final/base.safetensors")
    # the side it was made for (its 32 px data's, to the nearest side generation makes) is the
    # side it generates by default, not the family's 1024 px
    assert stage2.settings["resolution"] == stage2.native_size == 64
    before, after = stage1.transformer.state_dict(), stage2.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the transformer learned
    for part in ("vae", "text_encoder", "text_encoder_2"):  # and nothing else did
        a, b = stage1.modules()[part].state_dict(), stage2.modules()[part].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    cn = ["train", "--base", str(tmp_path / "base/final/base.safetensors"), "--arch", "flux-tiny"]
    assert main([*cn, "--out", str(tmp_path / "cn"), *common]) == 0
    gen = ["generate", "--base", str(tmp_path / "base/final/base.safetensors"), "--controlnet"]
    gen += [str(tmp_path / "cn/final/controlnet.safetensors"), "--image", str(data / "source/0.png")]
    gen += ["--prompt", "gold star with navy background", "--steps", "2"]
    assert main([*gen, "--out", str(tmp_path / "gen")]) == 0
    images = sorted((tmp_path / "gen").glob("*_0.png"))
    assert images and read_image(images[0]).shape[:2] == (64, 64)
    ev = ["eval", "--data", str(data), "--metric", "outlines", "--out", str(tmp_path / "ev"), "--n", "2"]
    ev += ["--base", str(tmp_path / "base/final/base.safetensors"), "--steps", "2", "--quiet"]
    assert (
        main([*ev, "--controlnet", str(tmp_path / "cn/final/controlnet.safetensors")]) == 0
    )  # (euler: its own)
    assert json.loads((tmp_path / "ev/results.json").read_text())["config"]["sampler"] == "euler"  # its own


def test_mixed_precision_steps_through_the_fused_blocks(flux):
    """As training runs on a GPU: the base in bf16, the ControlNet's float32 master weights under
    bf16 autocast; the fused blocks' in-place products take the autocast dtype too."""
    import copy

    base = copy.deepcopy(flux)
    objective = ControlNetObjective(base, base.new_controlnet({"num_layers": 1, "num_single_layers": 1}))
    objective.prepare(torch.device("cpu"), torch.bfloat16)
    images = torch.rand(2, 3, 16, 16)
    batch = {"target": images * 2 - 1, "cond": torch.rand(2, 3, 16, 16), "prompt": ["a", "b"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective(batch, StepNoise(0, 0, 0, 2, slice(0, 2), "cpu"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in objective.controlnet.parameters())


def test_long_captions_are_reported_per_text_encoder(capsys):
    """Flux reads a caption through CLIP-L's 75-token window and T5's max_sequence_length - 1:
    a caption past the first but within the second is cut for CLIP only."""
    from controlnet.training.recipes import _report_long_captions

    base = tiny_flux_base(max_sequence_length=512)
    words = " ".join(f"w{i}" for i in range(60))  # 120 CLIP tokens ("w" and the digits); T5: ~60 words

    class Captions:
        def __init__(self, prompts):
            self.prompts = prompts

        def __len__(self):
            return len(self.prompts)

        def prompt(self, i):
            return self.prompts[i]

    _report_long_captions(Captions([words, "a red circle"]), "DATA", base)
    out = capsys.readouterr().out
    assert "1 of 2 distinct captions in DATA are longer than CLIP-L's 75 tokens" in out
    assert "T5" not in out
    short_t5 = tiny_flux_base(max_sequence_length=64)
    _report_long_captions(Captions(["x" * 600, "a red circle"]), "DATA", short_t5)
    out = capsys.readouterr().out
    assert "longer than T5's 63 tokens; T5 reads the first 63" in out


def test_a_run_resumed_on_another_base_is_refused(files, tmp_path, capsys):
    """A Flux run whose base file now holds another model (a UNet, or Flux with other weights) is
    not resumed: one line naming the run and both bases, and the run's folder is left as it was."""
    import shutil

    from tiny import make_base

    base = tmp_path / "base.safetensors"
    shutil.copy(files / "flux.safetensors", base)
    args = ["train", "--base", str(base), "--data", str(files / "data"), *QUIET, "--validation-count", "0"]
    run = tmp_path / "run"
    assert main([*args, "--controlnet-config", '{"num_layers": 1}', "--steps", "1", "--out", str(run)]) == 0
    save_base(make_base(), base, overwrite=True)  # the same path, another model
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--quiet", "--cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{run} was trained on the base Flux.1-dev " in err and "now holds SD1.x " in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    save_base(tiny_flux_base(seed=1), base, overwrite=True)
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--quiet", "--cpu"]) == 2
    assert "now holds Flux.1-dev " in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
