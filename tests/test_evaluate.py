"""Evaluation: colour and shape scores on images whose right answer is known, the evaluation loop
end to end on tiny random models, parameter checks, and the written report."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import Family
from controlnet.data import generate, open_dataset, read_samples, render_sample, shape_masks
from controlnet.data.colors import color_distance, rgb
from controlnet.evaluation.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate,
    fill50k_scorer,
    prompt_colours,
    round_trip,
    write_report,
)
from controlnet.evaluation.metrics import COLOUR_TOLERANCE, edge_f1, ssim
from controlnet.imageio import to_uint8
from tiny import make_base, make_controlnet

FILL50K_KEYS = {
    "iou",
    "iou_median",
    "shape_delta_e",
    "background_delta_e",
    "shape_colour_ok",
    "background_colour_ok",
    "colour_accuracy",
    "free_background_delta_e",
    "free_shape_delta_e",
    "free_colour_ok",
    "free_iou",
}
FREE_KEYS = {"free_background_delta_e", "free_shape_delta_e", "free_colour_ok"}
CFG = EvalConfig(n=3, steps=2, batch=2, seed=7)  # two batches: 2 items, then 1


@pytest.fixture(scope="module")
def models():
    base = make_base(Family.SD1)
    return base, make_controlnet(base.unet, open_zero=True, seed=3)


@pytest.fixture(scope="module")
def fill_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("eval") / "fill", 5, size=64, seed=2, progress=False, workers=1)


@pytest.fixture(scope="module")
def dataset(fill_set):
    return open_dataset(fill_set)


@pytest.fixture(scope="module")
def result(models, dataset):
    return evaluate(*models, dataset, CFG, progress=False)


def outline_limited_iou(sample) -> float:
    """The IoU a perfect output scores: its filled shape against the filled outline (the truth)."""
    fill, outline = shape_masks(sample)
    return fill.sum() / (fill | outline).sum()


class Untouchable:
    """A data set that fails the test if evaluation reads an item before checking its parameters."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise AssertionError("evaluate read the data before checking its parameters")


# ------------------------------------------------------------------------------- prompt_colours
def test_prompt_colours_of_the_ground_truth_are_right(fill_set):
    for sample in read_samples(fill_set):
        source, target = render_sample(sample)
        s = prompt_colours(target, sample.color_rgb, sample.background_rgb)
        assert set(s) == FREE_KEYS
        assert s["free_background_delta_e"] == pytest.approx(0, abs=1e-9)
        assert s["free_shape_delta_e"] == pytest.approx(0, abs=1e-9)
        assert s["free_colour_ok"] == 1.0
        # with the condition: the far-from-background pixels are the filled shape
        with_cond = prompt_colours(target, sample.color_rgb, sample.background_rgb, source)
        assert with_cond["free_iou"] == pytest.approx(outline_limited_iou(sample))


def test_prompt_colours_fail_wrong_colours_and_a_missing_shape(fill_set):
    sample = read_samples(fill_set)[0]
    _, target = render_sample(sample)
    wrong = "black" if color_distance(sample.color, "black") > 30 else "white"
    s = prompt_colours(target, rgb(wrong), sample.background_rgb)
    assert s["free_shape_delta_e"] == pytest.approx(color_distance(sample.color, wrong))
    assert s["free_colour_ok"] == 0.0
    swapped = prompt_colours(target, sample.background_rgb, sample.color_rgb)
    assert swapped["free_colour_ok"] == 0.0
    assert swapped["free_background_delta_e"] > COLOUR_TOLERANCE
    # only the background: the "shape" is the background, as far from the prompt's shape colour
    # as the two prompt colours are from each other
    blank = np.empty_like(target)
    blank[:] = sample.background_rgb
    s = prompt_colours(blank, sample.color_rgb, sample.background_rgb)
    assert s["free_background_delta_e"] == pytest.approx(0, abs=1e-9)
    assert s["free_shape_delta_e"] == pytest.approx(color_distance(sample.background, sample.color))
    assert s["free_colour_ok"] == 0.0


# ------------------------------------------------------------------------------- fill50k_scorer
def test_fill50k_scorer_gives_the_ground_truth_full_marks(fill_set, dataset):
    samples = read_samples(fill_set)
    items = [dataset[i] for i in range(len(dataset))]
    targets = [to_uint8(it["target"]) for it in items]
    s = fill50k_scorer(targets, items)
    assert s["colour_accuracy"] == 1.0
    assert s["shape_colour_ok"] == 1.0 and s["background_colour_ok"] == 1.0
    assert s["shape_delta_e"] == pytest.approx(0, abs=1e-9)
    ious = [outline_limited_iou(x) for x in samples]
    assert s["iou"] == pytest.approx(np.mean(ious))
    assert s["iou_median"] == pytest.approx(np.median(ious))
    assert s["iou"] > 0.75  # the 64 px outline is 1 px wide; the smallest circles have radius 5


def test_fill50k_scorer_gives_a_shifted_circle_a_low_iou(fill_set, dataset):
    shifted = []
    for x in read_samples(fill_set):
        cx, cy = x.center
        dx = x.radius if cx + 2 * x.radius + x.line_width < x.size else -x.radius  # stay inside
        shifted.append(render_sample(dataclasses.replace(x, center=(cx + dx, cy)))[1])
    s = fill50k_scorer(shifted, [dataset[i] for i in range(len(dataset))])
    # two discs of radius r, centres r apart, overlap with IoU 0.243 (pixels and outline: about)
    assert 0.15 < s["iou"] < 0.3
    assert s["background_colour_ok"] == 1.0  # the colours are right, the place is not


# ------------------------------------------------------------------------------- evaluate
def test_evaluate_returns_a_scored_row_per_item(result, dataset):
    assert set(result.summary) == FILL50K_KEYS
    rows = result.per_sample
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["seed"] for r in rows] == [7, 8, 9]  # seed + item, across the batch boundary
    assert [r["prompt"] for r in rows] == [dataset.prompt(i) for i in range(3)]
    for k in FILL50K_KEYS - {"iou_median"}:
        assert result.summary[k] == pytest.approx(np.mean([r[k] for r in rows])), k
    assert result.summary["iou_median"] == pytest.approx(np.median([r["iou"] for r in rows]))
    for r in rows:
        assert 0 <= r["iou"] <= 1 and 0 <= r["free_iou"] <= 1
        assert r["colour_accuracy"] == (r["shape_colour_ok"] + r["background_colour_ok"]) / 2
    # examples: each condition as the data set gives it, beside its output
    assert len(result.examples) == 3
    for i, (cond, img) in enumerate(result.examples):
        assert np.array_equal(cond, dataset.load_arrays(i)[1])
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_evaluate_is_deterministic_and_seeds_belong_to_items_not_batches(models, dataset, result):
    again = evaluate(*models, dataset, CFG, progress=False)
    assert again.summary == result.summary and again.per_sample == result.per_sample
    one_batch = evaluate(*models, dataset, dataclasses.replace(CFG, batch=3), progress=False)
    assert [r["seed"] for r in one_batch.per_sample] == [7, 8, 9]
    for (_, a), (_, b) in zip(result.examples, one_batch.examples):
        assert np.abs(a.astype(int) - b).max() <= 2  # batched arithmetic may round differently
    other = evaluate(*models, dataset, dataclasses.replace(CFG, seed=100), progress=False)
    assert not np.array_equal(other.examples[0][1], result.examples[0][1])


def test_evaluate_scores_each_output_against_its_own_item(models, dataset, monkeypatch):
    """An oracle model that outputs each item's ground truth gets the ground truth's scores."""
    base, _ = models
    calls = []

    def sample_fn(emb, neg, cond, seeds, latent_size):
        calls.append((tuple(cond.shape), list(seeds), latent_size))
        return torch.stack([torch.full((4, *latent_size), float(s)) for s in seeds])

    def decode_latents(latents, **_):
        return torch.stack([dataset[int(s) - CFG.seed]["target"] for s in latents[:, 0, 0, 0]])

    monkeypatch.setattr(base, "decode_latents", decode_latents)
    res = evaluate(base, None, dataset, dataclasses.replace(CFG, n=100), progress=False, sample_fn=sample_fn)
    assert calls == [
        ((2, 3, 64, 64), [7, 8], (8, 8)),
        ((2, 3, 64, 64), [9, 10], (8, 8)),
        ((1, 3, 64, 64), [11], (8, 8)),
    ]
    assert len(res.per_sample) == len(dataset)  # n beyond the data set: every item once
    assert res.summary["colour_accuracy"] == 1.0 and res.summary["free_colour_ok"] == 1.0
    expected = [outline_limited_iou(s) for s in read_samples(dataset.root)]
    assert [r["iou"] for r in res.per_sample] == pytest.approx(expected)
    assert [r["free_iou"] for r in res.per_sample] == pytest.approx(expected)


def test_reconstruct_scores_the_vaes_round_trip_of_each_items_own_target(models, dataset, monkeypatch):
    """A lossless VAE (latents: the image itself, decoded as it was) scores the ground truth's
    marks; the posterior's mean is what is decoded, never a sample of it."""
    import types

    base, cn = models
    real = evaluate(base, None, dataset, dataclasses.replace(CFG, reconstruct=True), progress=False)
    for i, (_, img) in enumerate(real.examples):  # the real tiny VAE: each target's own round trip
        assert np.array_equal(img, round_trip(base, dataset[i]["target"][None])[0])
    assert real.summary.keys() == FILL50K_KEYS

    def posterior(images, **_):
        return types.SimpleNamespace(mean=images.float(), std=torch.full_like(images.float(), 5.0))

    monkeypatch.setattr(base, "posterior", posterior)
    monkeypatch.setattr(base, "decode_latents", lambda z, **_: z / base.latent_scale)
    res = evaluate(base, cn, dataset, dataclasses.replace(CFG, reconstruct=True, n=100), progress=False)
    assert res.summary["colour_accuracy"] == 1.0 and res.summary["free_colour_ok"] == 1.0
    expected = [outline_limited_iou(s) for s in read_samples(dataset.root)]
    assert [r["iou"] for r in res.per_sample] == pytest.approx(expected)
    assert real.summary["iou"] < res.summary["iou"]  # the tiny random VAE loses the shape


def test_evaluate_without_a_controlnet_scores_colours_only(models, dataset):
    base, _ = models
    res = evaluate(base, None, dataset, CFG, progress=False)
    assert set(res.summary) == FREE_KEYS
    assert all(set(r) == FREE_KEYS | {"index", "seed", "prompt"} for r in res.per_sample)


def test_prompt_setting_changes_the_prompt_not_the_scoring(models, dataset, result):
    res = evaluate(*models, dataset, dataclasses.replace(CFG, prompt_setting="none"), progress=False)
    assert [r["prompt"] for r in res.per_sample] == [r["prompt"] for r in result.per_sample]
    assert not np.array_equal(res.examples[0][1], result.examples[0][1])


@pytest.mark.parametrize(
    ("metric", "annotator", "keys"),
    [("edges", None, {"precision", "recall", "f1"}), ("ssim", "canny", {"ssim"})],
)
def test_other_metrics_score_the_output_shown(models, dataset, metric, annotator, keys):
    from controlnet.annotators import get

    cfg = dataclasses.replace(CFG, metric=metric, annotator=annotator)
    res = evaluate(*models, dataset, cfg, progress=False)
    assert set(res.summary) == keys
    for row, (cond, img) in zip(res.per_sample, res.examples):
        if metric == "edges":
            assert row["f1"] == edge_f1(img, cond)["f1"]
        else:
            assert row["ssim"] == ssim(get("canny")(img), cond)


def test_bad_parameters_are_refused_before_any_work(models):
    base, cn = models
    with pytest.raises(ValueError, match=r"prompt setting must be user, none or default, got 'auto'"):
        evaluate(base, cn, Untouchable(), dataclasses.replace(CFG, prompt_setting="auto"), progress=False)
    for metric in ("ssim", "depth", "segmentation"):
        with pytest.raises(ValueError, match=rf"metric {metric} needs the annotator .*--annotator"):
            evaluate(base, cn, Untouchable(), dataclasses.replace(CFG, metric=metric), progress=False)
    with pytest.raises(ValueError, match="unknown annotator 'cany'"):
        cfg = dataclasses.replace(CFG, metric="ssim", annotator="cany")
        evaluate(base, cn, Untouchable(), cfg, progress=False)
    with pytest.raises(ValueError, match="low_threshold"):
        cfg = dataclasses.replace(
            CFG, metric="ssim", annotator="canny", annotator_params={"low_threshold": -5}
        )
        evaluate(base, cn, Untouchable(), cfg, progress=False)
    with pytest.raises(ValueError, match=r"metric must be one of fill50k, outlines, edges, .*got 'iou'"):
        evaluate(base, cn, Untouchable(), dataclasses.replace(CFG, metric="iou"), progress=False)
    for name in ("n", "steps", "batch"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            evaluate(base, cn, Untouchable(), dataclasses.replace(CFG, **{name: 0}), progress=False)


# ------------------------------------------------------------------------------- write_report
def test_write_report_files_agree_with_the_result(result, tmp_path):
    out = tmp_path / "reports" / "run"  # made, parents included
    md = write_report(result, out, title="tiny check")
    assert md == out / "results.md"

    data = json.loads((out / "results.json").read_text())
    assert data["summary"] == result.summary
    assert data["per_sample"] == result.per_sample
    assert data["config"] == dataclasses.asdict(CFG)

    text = md.read_text()
    assert text.startswith("# tiny check\n")
    table = dict(re.findall(r"^\| (\w+) \| ([-\d.]+) \|$", text, re.M))
    assert set(table) == set(result.summary)
    for k, v in result.summary.items():
        assert float(table[k]) == pytest.approx(v, abs=5e-5), k
    assert "3 samples, 2 ddim steps, guidance 9.0, prompt setting 'user'." in text

    # one row of (condition | output) pairs, 64 px cells, 4 px white padding
    grid = np.asarray(Image.open(out / "examples.png").convert("RGB"))
    assert grid.shape == (4 + 68, 4 + 6 * 68, 3)
    cells = [img for pair in result.examples for img in pair]
    for k, img in enumerate(cells):
        assert np.array_equal(grid[4:68, 4 + 68 * k : 68 + 68 * k], img), k


def test_write_report_without_examples_writes_no_image(result, tmp_path):
    bare = EvalResult(result.config, result.summary, result.per_sample, [])
    write_report(bare, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == result.summary
    assert not (tmp_path / "examples.png").exists()


def test_evaluation_measures_exactly_what_generate_makes(models, dataset, tmp_path):
    """One generation path: an item's evaluated image equals ``controlnet generate``'s for its
    condition, prompt and seed with the same settings, pixel for pixel."""
    from controlnet.generation.check import check
    from controlnet.generation.generate import generate as run_generation
    from controlnet.generation.request import ControlRequest, GenerationRequest

    base, cn = models
    cfg = dataclasses.replace(CFG, n=2, batch=1, negative_prompt="lowres", guidance=4.0, sampler="euler-a")
    evaluated = evaluate(base, cn, dataset, cfg, progress=False)
    for k, row in enumerate(evaluated.per_sample):
        item = dataset[row["index"]]
        cond = tmp_path / f"cond{k}.png"
        Image.fromarray(to_uint8(item["cond"], lo=0.0)).save(cond)
        request = GenerationRequest(
            prompt=item["prompt"],
            added_prompt="",
            negative_prompt=cfg.negative_prompt,
            controls=[ControlRequest(str(cond), strength=cfg.strength)],
            sampler=cfg.sampler,
            steps=cfg.steps,
            guidance=cfg.guidance,
            seed=row["seed"],
            resolution=item["cond"].shape[-1],
        )
        made = run_generation(check(request), base, [cn], progress=False).images[0]
        np.testing.assert_array_equal(evaluated.examples[k][1], made)
