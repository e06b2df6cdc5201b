"""``controlnet demo``: a bundled model, end to end on a CPU in seconds.

An outline (a built-in one, or the user's drawing: white lines on black) goes through the same
loaders and pipeline as any model of its family; the demo writes the grid (condition | samples)
with each sample and its JSON sidecar, and prints how well the samples follow the condition and
the prompt's colours (the scores of :mod:`controlnet.evaluation.evaluate`). ``family`` picks the
bundled stack (:data:`controlnet.bundled.BUNDLED_MODELS`): the UNet one, trained on one circle per
image, whose built-in outline is a circle; or the Flux-style transformer one, trained on the
outlines world, whose built-in outline is several shapes, each scored in its own colour.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundled import BUNDLED_BASE, bundled_path, bundled_stack
from .data.figures import Figure, FigureKind
from .data.fill50k import Sample, Shape, line_width_for, render_sample
from .data.outlines import OutlineSample, default_line_width, render_outlines
from .evaluation.metrics import COLOUR_TOLERANCE, fill_outline
from .generation.request import ControlRequest, GenerationRequest
from .imageio import save_png

__all__ = ["DEMO_PROMPT", "DemoResult", "builtin_outline", "builtin_outlines", "run_demo"]

#: the bundled UNet model was trained on prompts of this form: "<colour> circle with <colour> background"
DEMO_PROMPT = "red circle with light sky blue background"
DEMO_SIZE = 128  # the bundled models' native size


@dataclass
class DemoResult:
    grid: Path
    sidecar: Path
    iou: float  # mean over samples; the shape's IoU with the outline's filled region
    colour_accuracy: float | None  # shape and background within tolerance of the prompt's colours
    seconds: float


def builtin_outline(size: int = DEMO_SIZE) -> np.ndarray:
    """The demo's condition: a circle outline as the fill50k data draw it, (size, size, 3) uint8."""
    sample = Sample(
        index=0,
        shape=Shape.CIRCLE,
        center=(size * 9 // 16, size * 7 // 16),
        radius=size * 5 // 16,
        rotation=0,
        color="white",
        background="black",
        size=size,
        line_width=line_width_for(size),
    )
    return render_sample(sample)[0]


def builtin_outlines(size: int = DEMO_SIZE) -> OutlineSample:
    """The transformer demo's condition: an orange ellipse and a royal blue pentagon that overlap,
    and a small red circle, on light yellow (kinds the outlines world trains on)."""
    figures = (
        Figure(FigureKind.ELLIPSE, (size * 0.34, size * 0.40), size * 0.25, 20.0, "orange", (0.6,)),
        Figure(FigureKind.POLYGON, (size * 0.64, size * 0.64), size * 0.25, 0.0, "royal blue", (5.0,)),
        Figure(FigureKind.CIRCLE, (size * 0.78, size * 0.22), size * 0.11, 0.0, "red"),
    )
    return OutlineSample(0, size, default_line_width(size), "light yellow", figures)


def run_demo(
    out_dir: str | Path = "outputs/demo",
    *,
    family: str = "unet",
    image: str | Path | None = None,
    prompt: str | None = None,
    samples: int = 4,
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 0,
    base: str | None = None,
    controlnet: str | None = None,
    progress: bool = True,
) -> DemoResult:
    """Generate ``samples`` images for the outline (built-in, or ``image``) with the bundled stack
    of ``family`` and score them.

    ``base`` / ``controlnet`` default to that stack's files; ``prompt`` to the built-in outline's;
    ``guidance`` to the base's own. Prints the grid's path and the scores."""
    from .generation.check import check
    from .generation.defaults import model_settings
    from .generation.pipeline import run

    bundled = bundled_stack(family)
    base_file = base or str(bundled_path(bundled.base))  # a build without the stack says so here
    if bundled.base != BUNDLED_BASE:  # (the pipeline's own default stack is left unnamed)
        base, controlnet = base_file, controlnet or str(bundled_path(bundled.controlnet))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builtin = image is None
    shapes = builtin_outlines() if bundled.world == "outlines" and builtin else None
    if builtin:
        cond_image = render_outlines(shapes)[0] if shapes is not None else builtin_outline()
        image = save_png(cond_image, out / "outline.png")
    if prompt is None:
        prompt = shapes.prompt if shapes is not None else DEMO_PROMPT
    settings: dict[str, Any] = {**bundled.settings, **model_settings(base_file)}  # how the model samples
    if guidance is not None:
        settings["guidance"] = guidance
    request = GenerationRequest(
        prompt=prompt,
        controls=[ControlRequest(image=str(image), controlnet=controlnet)],
        **{**settings, "base": base, "steps": steps, "seed": seed, "num_samples": samples},
        resolution=DEMO_SIZE if builtin else None,
    )
    checked = check(request)  # a clear error now for a missing or unreadable file
    print(
        f"controlnet demo ({family}): {samples} samples, {steps} {checked.request.sampler.value} steps, "
        f"guidance {checked.request.guidance:g}, prompt {prompt!r}"
    )
    start = time.perf_counter()
    result, sidecar = run(checked, out, progress=progress)
    seconds = time.perf_counter() - start
    assert sidecar is not None
    grid = sidecar.parent / json.loads(sidecar.read_text())["outputs"]["grid"]
    cond = result.conditions[0]
    if shapes is not None and prompt == shapes.prompt:
        iou, accuracy = _outline_scores(result.images, shapes)
    else:
        iou, accuracy = _scores(result.images, cond, prompt)
    print(f"wrote {grid} (condition | samples) and {sidecar} in {seconds:.1f} s")
    line = f"controllability: IoU of the filled shapes with the outline {iou:.3f}"
    if accuracy is not None:
        line += f"; colour accuracy (CIEDE2000 <= {COLOUR_TOLERANCE:g}) {accuracy:.3f}"
    print(line + f" (mean over {samples} samples)")
    return DemoResult(grid=grid, sidecar=sidecar, iou=iou, colour_accuracy=accuracy, seconds=seconds)


def _outline_scores(images: list[np.ndarray], sample: OutlineSample) -> tuple[float, float]:
    """Mean IoU and colour accuracy over the outline's shapes, each in its own colour."""
    from .evaluation.evaluate import outline_item_scores

    rows = [outline_item_scores(img, sample) for img in images]
    return float(np.mean([r["iou"] for r in rows])), float(np.mean([r["colour_accuracy"] for r in rows]))


def _scores(images: list[np.ndarray], cond: np.ndarray, prompt: str) -> tuple[float, float | None]:
    """Mean IoU and colour accuracy; for a prompt that names no fill50k colours, the IoU of the
    pixels unlike the background (the border's median colour) with the outline's region."""
    from .evaluation.evaluate import fill50k_scores, prompt_colours

    if not fill_outline(cond).any():
        print("note: the condition holds no closed outline; the IoU compares against an empty shape")
    try:
        rows = [fill50k_scores(img, cond, prompt) for img in images]
    except ValueError:
        ious = [prompt_colours(img, (0, 0, 0), (0, 0, 0), condition=cond)["free_iou"] for img in images]
        return float(np.mean(ious)), None
    return float(np.mean([r["iou"] for r in rows])), float(np.mean([r["colour_accuracy"] for r in rows]))
