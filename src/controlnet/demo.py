"""``controlnet demo``: the bundled model, end to end on a CPU in seconds.

An outline (a built-in circle, or the user's drawing: white lines on black) goes through the same
loaders and pipeline as any Stable Diffusion model; the demo writes the grid (condition | samples)
with each sample and its JSON sidecar, and prints how well the samples follow the condition and
the prompt's colours (the fill50k scores of :mod:`controlnet.evaluation.evaluate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundled import BUNDLED_GUIDANCE, BUNDLED_SETTINGS
from .data.fill50k import Sample, Shape, line_width_for, render_sample
from .evaluation.metrics import COLOUR_TOLERANCE, fill_outline
from .generation.request import ControlRequest, GenerationRequest
from .imageio import save_png

__all__ = ["DEMO_PROMPT", "DemoResult", "builtin_outline", "run_demo"]

#: the bundled model was trained on prompts of this form: "<colour> circle with <colour> background"
DEMO_PROMPT = "red circle with light sky blue background"
DEMO_SIZE = 128  # the bundled model's native size


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


def run_demo(
    out_dir: str | Path = "outputs/demo",
    *,
    image: str | Path | None = None,
    prompt: str = DEMO_PROMPT,
    samples: int = 4,
    steps: int = 20,
    guidance: float = BUNDLED_GUIDANCE,
    seed: int = 0,
    base: str | None = None,
    controlnet: str | None = None,
    progress: bool = True,
) -> DemoResult:
    """Generate ``samples`` images for the outline (built-in, or ``image``) and score them.

    ``base`` / ``controlnet`` default to the bundled files. Prints the grid's path and the scores.
    """
    from .generation.check import check
    from .generation.pipeline import run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cond_path = save_png(builtin_outline(), out / "outline.png") if image is None else Path(image)
    request = GenerationRequest(
        prompt=prompt,
        controls=[ControlRequest(image=str(cond_path), controlnet=controlnet)],
        **{**BUNDLED_SETTINGS, "guidance": guidance},  # the prompt alone, as in its training
        base=base,
        steps=steps,
        seed=seed,
        num_samples=samples,
        resolution=DEMO_SIZE if image is None else None,
    )
    checked = check(request)  # a clear error now for a missing or unreadable file
    print(f"controlnet demo: {samples} samples, {steps} DDIM steps, guidance {guidance:g}, prompt {prompt!r}")
    start = time.perf_counter()
    result, sidecar = run(checked, out, progress=progress)
    seconds = time.perf_counter() - start
    assert sidecar is not None
    grid = sidecar.parent / json.loads(sidecar.read_text())["outputs"]["grid"]
    cond = result.conditions[0]
    iou, accuracy = _scores(result.images, cond, prompt)
    print(f"wrote {grid} (condition | samples) and {sidecar} in {seconds:.1f} s")
    line = f"controllability: IoU of the shape with the outline {iou:.3f}"
    if accuracy is not None:
        line += f"; colour accuracy (CIEDE2000 <= {COLOUR_TOLERANCE:g}) {accuracy:.3f}"
    print(line + f" (mean over {samples} samples)")
    return DemoResult(grid=grid, sidecar=sidecar, iou=iou, colour_accuracy=accuracy, seconds=seconds)


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
