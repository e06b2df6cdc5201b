"""Controllability, measured: generate for a set of conditions and prompts, score every output.

Metrics (see :mod:`controlnet.evaluation.metrics` for the per-image measures):
- ``fill50k``: IoU of the generated shape with the condition's (the filled outline), and colour
  accuracy of the shape and of the background against the prompt's named colours.
- ``outlines``: the same per shape for the outlines world (several shapes, each its own colour),
  against each shape's visible region re-derived from the set's recorded parameters.
- ``edges``: F1 of Canny edges re-extracted from the output against the condition's edges.
- ``ssim``: SSIM between the condition map and the same annotator's map of the output (soft
  edges, line art).
- ``depth`` / ``segmentation``: RMSE of depth maps / mean IoU of label maps, re-extracted from
  the output with the matching learned annotator (its weights given by the user).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..choices import EvalMetric
from ..families.protocol import BaseModel
from ..generation.denoiser import ControlUnit
from ..generation.generate import resolve_prompt
from ..generation.request import GenerationRequest
from ..generation.sampling import Sampling, render, to_images
from ..imageio import atomic_write_bytes, make_grid, save_png, to_uint8
from .metrics import (
    COLOUR_TOLERANCE,
    edge_f1,
    image_outline_scores,
    mean_iou,
    outline_shapes,
    rmse,
    shape_and_colour,
    ssim,
)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "Metric",
    "evaluate",
    "fill50k_scorer",
    "fill50k_scores",
    "outline_item_scores",
    "outlines_scorer",
    "prompt_colours",
    "round_trip",
    "write_report",
]


Metric = EvalMetric


@dataclass
class EvalConfig:
    n: int = 200
    steps: int = 20
    guidance: float = 9.0
    sampler: str = "ddim"
    seed: int = 0
    batch: int = 25
    prompt_setting: str = "user"  # user | none | default (the paper's prompt settings)
    negative_prompt: str = ""
    strength: float = 1.0
    metric: str = Metric.FILL50K.value
    annotator: str | None = None  # for ssim / depth / segmentation: the map's annotator
    annotator_params: dict[str, Any] = field(default_factory=dict)
    #: score the VAE's round trip of each item's target instead of a generation: the most any
    #: model on this VAE can score (no ControlNet, no sampling)
    reconstruct: bool = False


@dataclass
class EvalResult:
    config: EvalConfig
    summary: dict[str, float]
    per_sample: list[dict[str, Any]]
    examples: list[list[np.ndarray]]  # rows of (condition, output) for a grid


def prompt_colours(
    image: np.ndarray,
    shape_rgb: Sequence[int],
    background_rgb: Sequence[int],
    condition: np.ndarray | None = None,
) -> dict[str, float]:
    """Colour scores that need no knowledge of where the shape is (outputs made without a
    condition, e.g. the base model alone): the background is the median of the border pixels, the
    shape the median of the pixels far from it. With ``condition``, also ``free_iou``: the IoU of
    those far pixels with the condition's region, which measures shape following whatever colours
    the model chose (the no-prompt setting)."""
    from ..data.colors import delta_e, srgb_to_lab

    lab = srgb_to_lab(image)
    far, back = _unlike_border(lab)
    shape = np.median(lab[far], 0) if far.mean() > 0.01 else back
    d_back = float(delta_e(back, srgb_to_lab(background_rgb)))
    d_shape = float(delta_e(shape, srgb_to_lab(shape_rgb)))
    out = {
        "free_background_delta_e": d_back,
        "free_shape_delta_e": d_shape,
        "free_colour_ok": float(d_back <= COLOUR_TOLERANCE and d_shape <= COLOUR_TOLERANCE),
    }
    if condition is not None:
        from .metrics import fill_outline, region_iou

        out["free_iou"] = region_iou(far, fill_outline(condition))
    return out


def _unlike_border(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of a CIE Lab image unlike its background - the median of its border pixels -
    beyond :data:`COLOUR_TOLERANCE`, and that background colour."""
    from ..data.colors import delta_e

    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    back = np.median(border, 0)
    return delta_e(lab, back) > COLOUR_TOLERANCE, back


def fill50k_scorer(images: list[np.ndarray], items: list[dict[str, Any]]) -> dict[str, float]:
    """Mean fill50k scores of generated images against their dataset items (a validation scorer)."""
    rows = [fill50k_scores(img, to_uint8(it["cond"], lo=0.0), it["prompt"]) for img, it in zip(images, items)]
    return _summary(rows)


def fill50k_scores(image: np.ndarray, cond: np.ndarray, prompt: str) -> dict[str, float]:
    """One output's fill50k scores against its outline and its prompt's colours (a ValueError for
    a prompt that is not of the fill50k form)."""
    from ..data.colors import rgb
    from ..data.fill50k import parse_prompt

    colour, _, background = parse_prompt(prompt)
    s = shape_and_colour(image, cond, rgb(colour), rgb(background))
    s["shape_colour_ok"] = float(s["shape_delta_e"] <= COLOUR_TOLERANCE)
    s["background_colour_ok"] = float(s["background_delta_e"] <= COLOUR_TOLERANCE)
    s["colour_accuracy"] = (s["shape_colour_ok"] + s["background_colour_ok"]) / 2
    return s


def outline_item_scores(image: np.ndarray, sample: Any) -> dict[str, Any]:
    """One output's outlines scores (:func:`~controlnet.evaluation.metrics.outline_scores`, and
    ``free_iou``) against the shapes of ``sample`` (an ``OutlineSample``) and its colours, and under
    ``shapes`` each shape's (its visible ``share`` of the image, ``iou``, ``colour_ok``)."""
    from ..data.colors import rgb
    from ..data.outlines import visible_masks

    if image.shape[:2] != (sample.size, sample.size):
        raise ValueError(
            f"outlines are scored at their set's own size ({sample.size} px), not {image.shape[1]}x"
            f"{image.shape[0]}: open the set without --resolution"
        )
    from ..data.colors import srgb_to_lab
    from .metrics import region_iou

    colours = [rgb(f.color) for f in sample.figures]
    masks = visible_masks(sample)
    rows, whole = outline_shapes(image, masks, colours, rgb(sample.background))
    scores: dict[str, Any] = image_outline_scores(rows, whole)
    # the shapes whatever their colours (the no-prompt setting): pixels unlike the border's colour
    scores["free_iou"] = region_iou(_unlike_border(srgb_to_lab(image))[0], np.logical_or.reduce(masks))
    scores["shapes"] = [
        {"share": r["area"] / image[..., 0].size, "iou": r["iou"], "colour_ok": r["colour_ok"]} for r in rows
    ]
    return scores


def outlines_scorer(dataset: Any) -> Callable[[list[np.ndarray], list[dict[str, Any]]], dict[str, float]]:
    """A validation scorer for an outlines set: mean :func:`outline_scores` of generated images
    against their items' shapes (not by size class: a validation set holds a few shapes of each)."""
    from ..data.outlines import samples_of

    samples = samples_of(dataset)
    return lambda images, items: _summary(
        [outline_item_scores(img, samples[int(it["index"])]) for img, it in zip(images, items)],
        by_size=False,
    )


#: classes of the outlines world's shapes by visible area, as a share of the image, with their upper
#: bounds (at 128 px: under 164 px, about 13x13; under 820 px; the rest)
SIZE_CLASSES = (("tiny", 0.01), ("small", 0.05), ("large", float("inf")))


def _summary(rows: list[dict[str, Any]], *, by_size: bool = True) -> dict[str, float]:
    """The rows' numbers averaged (IoU's median too); for outlines rows (``by_size``), the shapes
    of every image pooled by size class: ``shape_colour_ok_tiny``, ``shape_iou_tiny``, ... (the
    classes that have shapes)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if "iou" in out:
        out["iou_median"] = float(np.median([r["iou"] for r in rows]))
    shapes = [shape for r in rows for shape in r.get("shapes", ())] if by_size else []
    lower = 0.0
    for name, upper in SIZE_CLASSES:
        these = [shape for shape in shapes if lower <= shape["share"] < upper]
        if these:
            out[f"shape_colour_ok_{name}"] = float(np.mean([shape["colour_ok"] for shape in these]))
            out[f"shape_iou_{name}"] = float(np.mean([shape["iou"] for shape in these]))
        lower = upper
    return out


def _score(
    metric: Metric, image: np.ndarray, cond: np.ndarray, prompt: str, ann: Callable | None, sample: Any
) -> dict[str, float]:
    if metric is Metric.FILL50K:
        return fill50k_scores(image, cond, prompt)
    if metric is Metric.OUTLINES:
        return outline_item_scores(image, sample)
    if metric is Metric.EDGES:
        return edge_f1(image, cond)
    assert ann is not None
    extracted = ann(image)
    if metric is Metric.SSIM:
        return {"ssim": ssim(extracted, cond)}
    if metric is Metric.DEPTH:
        return {"depth_rmse": rmse(extracted.mean(-1), cond.mean(-1))}
    from ..annotators.segmentation import colors_to_labels

    pred, truth = colors_to_labels(extracted), colors_to_labels(cond)
    return {"miou": mean_iou(pred, truth, num_classes=int(max(pred.max(), truth.max())) + 1)}


def _prompt(setting: str, prompt: str) -> str:
    """The text generation reads for an item's prompt under ``setting`` (no added prompt)."""
    return resolve_prompt(GenerationRequest(prompt=prompt, prompt_setting=setting, added_prompt=""))


def round_trip(base: BaseModel, targets: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1] through the base's VAE: encoded to the posterior's mean, decoded."""
    post = base.posterior(targets.to(base.device))
    return to_images(
        base, base.scaled_sample(post.mean, post.std, torch.zeros_like(post.mean)).to(base.dtype)
    )


def _with_condition(sample_fn: SampleFn, cond: torch.Tensor) -> Any:
    """``sample_fn`` given the batch's conditions, as the one generation path calls it."""
    return lambda emb, neg, seeds, latent_size: sample_fn(emb, neg, cond, seeds, latent_size)


#: (prompt embeddings, negative embeddings (None at guidance 1), condition batch, seeds, latent size)
#: -> latents; for models that take their condition another way than a ControlNet (the ``concat``
#: ablation).
SampleFn = Callable[[Any, Any, torch.Tensor, list[int], tuple[int, int]], torch.Tensor]


@torch.no_grad()
def evaluate(
    base: BaseModel,
    controlnet: torch.nn.Module | None,
    dataset: Any,
    cfg: EvalConfig,
    *,
    progress: bool = True,
    sample_fn: SampleFn | None = None,
) -> EvalResult:
    """Generate one image per item for the first ``cfg.n`` items and score each; with no
    ControlNet (and no ``sample_fn``), generate from the prompts alone (scored by
    :func:`prompt_colours`); with ``cfg.reconstruct``, score the VAE's round trip of each item's
    target instead (:func:`round_trip`; ``controlnet`` is not used)."""
    try:
        metric = Metric(cfg.metric)
    except ValueError:
        raise ValueError(
            f"metric must be one of {', '.join(m.value for m in Metric)}, got {cfg.metric!r}"
        ) from None
    for name in ("n", "steps", "batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.prompt_setting not in ("user", "none", "default"):
        raise ValueError(f"prompt setting must be user, none or default, got {cfg.prompt_setting!r}")
    ann = None
    if metric in (Metric.SSIM, Metric.DEPTH, Metric.SEGMENTATION):
        if not cfg.annotator:
            raise ValueError(
                f"metric {metric.value} needs the annotator that made the condition maps (--annotator)"
            )
        from ..annotators import get

        a = get(cfg.annotator)
        params = a.check_params(cfg.annotator_params)

        def ann(img: np.ndarray) -> np.ndarray:
            return a(img, **params)

    samples: list[Any] = []
    if metric is Metric.OUTLINES:
        from ..data.outlines import samples_of

        samples = samples_of(dataset)
    n = min(cfg.n, len(dataset))
    rows: list[dict[str, Any]] = []
    examples: list[list[np.ndarray]] = []
    bar = tqdm(total=n, desc="evaluating", unit="image", disable=not progress)
    for start in range(0, n, cfg.batch):
        items = [dataset[i] for i in range(start, min(n, start + cfg.batch))]
        prompts = [_prompt(cfg.prompt_setting, it["prompt"]) for it in items]
        cond = torch.stack([it["cond"] for it in items]).to(base.device, base.dtype)
        seeds = [cfg.seed + start + i for i in range(len(items))]
        if cfg.reconstruct:
            images = round_trip(base, torch.stack([it["target"] for it in items]))
        else:
            units = [] if controlnet is None else [ControlUnit(controlnet, cond, cfg.strength)]
            fn = None if sample_fn is None else _with_condition(sample_fn, cond)
            out = render(
                base,
                units,
                prompts,
                [cfg.negative_prompt] * len(items),
                seeds,
                tuple(cond.shape[-2:]),  # type: ignore[arg-type]
                Sampling(cfg.sampler, steps=cfg.steps, guidance=cfg.guidance),
                sample_fn=fn,
                progress=False,
            )
            images = to_images(base, out.latents)
        conditioned = controlnet is not None or sample_fn is not None or cfg.reconstruct
        for it, img, seed in zip(items, images, seeds):
            cmap = to_uint8(it["cond"], lo=0.0)
            row: dict[str, Any] = {"index": int(it["index"]), "seed": seed, "prompt": it["prompt"]}
            if conditioned:
                sample = samples[int(it["index"])] if samples else None
                row.update(_score(metric, img, cmap, it["prompt"], ann, sample))
            if metric is Metric.FILL50K:
                from ..data.colors import rgb
                from ..data.fill50k import parse_prompt

                colour, _, background = parse_prompt(it["prompt"])
                row.update(prompt_colours(img, rgb(colour), rgb(background), cmap if conditioned else None))
            rows.append(row)
            if len(examples) < 16:
                examples.append([cmap, img])
        bar.update(len(items))
    bar.close()
    return EvalResult(
        cfg,
        _summary([{k: v for k, v in r.items() if k not in ("index", "seed", "prompt")} for r in rows]),
        rows,
        examples,
    )


def write_report(result: EvalResult, out_dir: str | Path, title: str = "evaluation") -> Path:
    """``results.json`` (config, summary, per sample), ``results.md`` (a table) and
    ``examples.png`` (condition | output pairs); returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"config": asdict(result.config), "summary": result.summary, "per_sample": result.per_sample}
    atomic_write_bytes(out / "results.json", (json.dumps(data, indent=1) + "\n").encode())
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result.summary.items()]
    lines += [
        "",
        f"{len(result.per_sample)} samples, "
        + (
            "each the VAE's round trip of its target (no generation)."
            if result.config.reconstruct
            else f"{result.config.steps} {result.config.sampler} steps, guidance {result.config.guidance}, "
            f"prompt setting {result.config.prompt_setting!r}."
        ),
        "",
    ]
    md = out / "results.md"
    atomic_write_bytes(md, "\n".join(lines).encode())
    if result.examples:
        pairs = result.examples
        rows = [[img for pair in pairs[i : i + 4] for img in pair] for i in range(0, len(pairs), 4)]
        save_png(make_grid(rows), out / "examples.png")
    return md
