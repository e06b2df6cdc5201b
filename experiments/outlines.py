"""The next bundled models, on the outlines world (issue 32): a UNet ControlNet and a Flux-style
transformer stack that follow any outline, made and measured with `controlnet` commands.

    python experiments/outlines.py data     --work WORK   # train / test / held-out / validation sets (CPU)
    python experiments/outlines.py unet     --work WORK   # the UNet stack on a 4x VAE: VAE, base, ControlNet (GPU)
    python experiments/outlines.py flux     --work WORK   # flux-tiny: VAE, transformer, ControlNet (GPU)
    python experiments/outlines.py ceiling  --work WORK   # each stack's VAE round trips scored: the most any model can (GPU or CPU)
    python experiments/outlines.py conditions --work WORK # flux-tiny's VAE round trips of the outlines themselves (CPU)
    python experiments/outlines.py evaluate --work WORK   # both, on every test set (GPU or CPU)
    python experiments/outlines.py claims   --work WORK   # claims 2 and 4 on flux-tiny's ControlNet: it and its twin with no empty prompts trained side by side (GPU)
    python experiments/outlines.py identity --work WORK   # claim 1 on both: zero-init identity (CPU)

Data: training pairs with every kind of shape but stars (seed 0); test pairs of those kinds
(seed 1) and of stars alone, the kind held out of training (seed 1); validation pairs (seed 2).
The targets (issue 32): IoU >= 0.90 and colour accuracy >= 0.90 in distribution, IoU >= 0.85 on
the held-out kind, each shape in its own prompted colour (``shape_colour_ok``) >= 0.85.
Results land in WORK/results/. --smoke runs everything at toy scale on a CPU (to check the
script; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
# run, start: each prints its command as one would type it, and logs it
from fill50k import run, signals_left_to_children, start, wait_for

from controlnet.bundled import BUNDLED_BASE, BUNDLED_MODELS, bundled_path
from controlnet.training.checkpoints import latest_checkpoint

HELD_OUT = "star"
TRAIN_KINDS = "circle,ellipse,polygon,rounded,blob"
S: dict[str, Any] = {
    "size": 128,
    "n_train": 100_000,
    "n_test": 500,
    "n_val": 150,
    "device": "--mixed-precision bfloat16 --num-workers 8",
    "loop": "--validate-every 100 --validation-count 16 --checkpoint-every 500 --log-every 50 --quiet",
    # the UNet stack's base from scratch on its 4x VAE (its prompts name several shapes, each its own
    # colour: a ControlNet on the circles-only base reached IoU 0.36, docs/bundled-model.md; offset
    # noise is what made the circles base paint its colours)
    "unet_base": "--steps 6000 --batch-size 512 --lr 5e-4 --warmup-steps 200 --lr-schedule cosine --noise-offset 0.25",
    "unet": "--steps 4000 --batch-size 256 --lr 2e-4 --warmup-steps 100 --lr-schedule cosine --noise-offset 0.25",
    # the VAEs first, both 4x: on the 8x VAEs of the first trainings (the UNet's learned circles,
    # flux-tiny's 4 latent channels for 2,500 steps) even a perfect model could not reach the targets
    # (`ceiling`: their round trips of the test targets scored IoU 0.78 and 0.87, tiny shapes in their
    # colour 1% and 21% of the time; flux-tiny's 4x VAE: IoU 0.93, tiny shapes 74%)
    # (validated every 500 steps: a VAE has no convergence step to catch, and its steps are small,
    # so validation's share of the time is cut; the curve keeps 12 to 16 points)
    "unet_vae": "--steps 8000 --batch-size 64 --lr 3e-4 --warmup-steps 100 --lr-schedule cosine --validate-every 500",
    "flux_vae": "--steps 8000 --batch-size 64 --lr 3e-4 --warmup-steps 100 --lr-schedule cosine --validate-every 500",
    "flux_base": "--steps 6000 --batch-size 512 --lr 5e-4 --warmup-steps 200 --lr-schedule cosine",
    "flux_cn": "--steps 4000 --batch-size 256 --lr 2e-4 --warmup-steps 100 --lr-schedule cosine",
    "eval": "--steps 20",
}
SMOKE = {
    "size": 64, "n_train": 32, "n_test": 4, "n_val": 4, "device": "--cpu --num-workers 0",
    "loop": "--validate-every 2 --validation-count 2 --validation-steps 2 --quiet",
    "unet_vae": "--steps 2 --batch-size 4 --lr 1e-4", "unet_base": "--steps 2 --batch-size 4 --lr 1e-4", "unet": "--steps 2 --batch-size 4 --lr 1e-4", "flux_vae": "--steps 2 --batch-size 4 --lr 3e-4",
    "flux_base": "--steps 2 --batch-size 4 --lr 3e-4", "flux_cn": "--steps 2 --batch-size 4 --lr 1e-4",
    "eval": "--steps 2",
}  # fmt: skip
SETS = {  # name: (seed, kinds, count key)
    "train": (0, TRAIN_KINDS, "n_train"),
    "test": (1, TRAIN_KINDS, "n_test"),
    "test-stars": (1, HELD_OUT, "n_test"),
    "val": (2, TRAIN_KINDS, "n_val"),
}


def stage_data(work: Path, names: tuple[str, ...] = tuple(SETS)) -> None:
    for name in names:
        seed, kinds, n = SETS[name]
        if not (work / name / "prompt.json").is_file():
            run(
                f"data outlines --out {work}/{name} --n {S[n]} --size {S['size']} --seed {seed} --kinds {kinds} --quiet"
            )


def _command(work: Path, name: str, args: str) -> tuple[str, Path]:
    """The ``controlnet`` command that trains run ``name`` on from where it is (resumed where it
    stopped, if it has checkpoints: a GPU session may end in the middle of one), and its log.
    ``args`` come last: a stage's own flags win over the shared loop's."""
    out, log = work / "runs" / name, work / "logs" / f"{name}.log"
    if latest_checkpoint(out) is not None:
        return f"train --resume --out {out} --quiet", log.with_suffix(".resumed.log")
    return f"train --data {work}/train --out {out} {S['device']} {S['loop']} {args}", log


def _train(work: Path, name: str, args: str) -> Path:
    """Train run ``name`` (skipped once it has its export) and return its export folder."""
    return _train_side_by_side(work, {name: args})[name]


def _train_side_by_side(work: Path, runs: dict[str, str], cache: Path | None = None) -> dict[str, Path]:
    """Train the runs ``{name: args}`` that have no export yet, all at once (one GPU holds several
    of these small models' runs with room to spare: side by side they take little more than one
    alone); their export folders. Runs that share a latent ``cache`` not yet built wait for the
    first run to build it. Ctrl-C or SIGTERM reaches every run (each stops after its step with a
    checkpoint); a failed run is named with its log's end once all have stopped."""
    finals = {name: work / "runs" / name / "final" for name in runs}
    todo = {name: _command(work, name, args) for name, args in runs.items() if not finals[name].is_dir()}
    if todo:
        stage_data(work, ("train",))
        (work / "logs").mkdir(parents=True, exist_ok=True)
    if len(todo) == 1:
        run(*next(iter(todo.values())))
    elif todo:
        children: dict[str, subprocess.Popen] = {}
        for name, (args, log) in todo.items():
            if children and cache is not None and not cache.is_dir():  # the first run builds it
                wait_for_path(cache, list(children.values()))
            children[name] = start(args, log)
        codes = dict(zip(children, wait_for(list(children.values()))))
        failed = [name for name, code in codes.items() if code != 0]
        if failed:
            raise SystemExit("\n".join(f"failed: {n}\n{todo[n][1].read_text()[-3000:]}" for n in failed))
    return finals


def wait_for_path(path: Path, children: list[subprocess.Popen]) -> None:
    """Wait until ``path`` exists or a child has ended (signals left to the children)."""
    with signals_left_to_children():
        while not path.exists() and all(child.poll() is None for child in children):
            time.sleep(5)


def stage_unet(work: Path) -> None:
    """The UNet stack for the outlines world (``outlines-unet``: fill50k-tiny's UNet and text
    encoder over a 4x VAE): its VAE, then its base (UNet and text encoder) on that VAE's latents,
    then its ControlNet on that base, all from scratch (the bundled circles stack's VAE is 8x, and
    its ControlNet's hint encoder with it)."""
    vae = _train(work, "unet-vae", f"--objective vae --arch outlines-unet {S['unet_vae']}")
    base = _train(work, "unet-base", f"--objective base --base {vae}/base.safetensors "
                  f"--cache {work}/cache-unet-base {S['unet_base']}")  # fmt: skip
    _train(work, "unet", f"--base {base}/base.safetensors --arch outlines-unet --cache {work}/cache-unet "
           f"--score-name shape_iou --score-threshold 0.6 {S['unet']}")  # fmt: skip


def _flux_base_export(work: Path) -> Path:
    """Where the flux-base run in ``work`` exports flux-tiny's base."""
    return work / "runs/flux-base/final/base.safetensors"


def flux_base(work: Path) -> Path:
    """flux-tiny's base: this work folder's export, else the shipped one (that export in float16,
    ``outlines-flux-base.safetensors``), else a path that is not there yet."""
    own = _flux_base_export(work)
    if own.is_file():
        return own
    try:
        return bundled_path(BUNDLED_MODELS["flux"].base)
    except FileNotFoundError:
        return own


def stage_flux(work: Path) -> None:
    """flux-tiny from scratch: its VAE, its transformer (flow matching), then its ControlNet. A
    base already exported in WORK (``runs/flux-base/final``, as a GPU session carried it on from
    an earlier one's export) is built on as it is."""
    base = _flux_base_export(work)
    if not base.is_file():
        vae = _train(work, "flux-vae", f"--objective vae --arch flux-tiny {S['flux_vae']}")
        _train(work, "flux-base", f"--objective base --base {vae}/base.safetensors "
               f"--cache {work}/cache-flux {S['flux_base']}")  # fmt: skip
    _train(work, "flux-cn", _flux_cn_args(work, base))


#: claim 4's twin of flux-cn: the same run with no empty prompts
NO_DROP = "--empty-prompt-prob 0"


def _flux_cn_args(work: Path, base: Path, extra: str = "") -> str:
    """flux-tiny's ControlNet run on ``base`` (its latents cached with the base stage's)."""
    return (f"--base {base} --arch flux-tiny --cache {work}/cache-flux --score-name shape_iou "
            f"--score-threshold 0.6 {S['flux_cn']} {extra}").strip()  # fmt: skip


def _eval(work: Path, name: str, data: str, args: str) -> dict[str, Any]:
    """``controlnet eval ARGS`` on the outlines set ``data``, written to results/NAME (logged to
    logs/NAME.log); its summary."""
    out = work / "results" / name
    run(f"eval --data {work}/{data} --metric outlines --out {out} --n {S['n_test']} {args} --quiet",
        work / "logs" / f"{name}.log")  # fmt: skip
    return json.loads((out / "results.json").read_text())["summary"]


def stack_vae(work: Path, model: str) -> Path:
    """The VAE a stack ("unet" or "flux") has got so far: this folder's VAE stage, else the base it
    started from (the bundled UNet base; flux-tiny's shipped or trained base)."""
    own = work / "runs" / f"{model}-vae" / "final/base.safetensors"
    if own.is_file():
        return own
    return Path(bundled_path(BUNDLED_BASE)) if model == "unet" else flux_base(work)


def stage_ceiling(work: Path) -> None:
    """The most any model on each stack's VAE can score: the VAE's round trips of the test targets
    (`eval --reconstruct`), for the VAE each stack has got so far (this folder's VAE stage, else the
    base it started from)."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for model in ("unet", "flux"):
        vae = stack_vae(work, model)
        if not vae.is_file():
            print(f"skipping {model}: no {vae}")
            continue
        for data in ("test", "test-stars"):
            summary = _eval(work, f"ceiling-{model}-{data}", data, f"--reconstruct --base {vae}")
            results[f"{model} {data}"] = {"vae": str(vae), **summary}
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / "ceiling.json").write_text(json.dumps(results, indent=2) + "\n")
    _table(results)


def stage_conditions(work: Path) -> None:
    """What a ControlNet reading its condition as VAE latents (InstantX's convention) could see: the
    flux stack's VAE round trips of the test outlines (white on black, which it never trained on),
    thresholded, against the outlines (IoU), and a figure of the first eight over their round trips.
    This is why flux-tiny's ControlNet reads the outline as pixels through the paper's hint encoder
    (``pixel_hint_channels``: XLabs' convention) instead."""
    import numpy as np
    import torch
    from PIL import Image

    from controlnet.data.datasets import open_dataset
    from controlnet.evaluation.evaluate import round_trip
    from controlnet.evaluation.metrics import region_iou
    from controlnet.formats.api import load_base
    from controlnet.imageio import to_uint8

    stage_data(work, ("test",))  # the one set this stage reads
    vae = stack_vae(work, "flux")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, data = load_base(vae, dtype=torch.float32).to(device), open_dataset(work / "test")
    n = min(S["n_test"], len(data))
    outlines, back = [], []
    for first in range(0, n, 50):
        conds = torch.stack([data[i]["cond"] for i in range(first, min(first + 50, n))])
        back += round_trip(base, conds * 2 - 1)
        outlines += [to_uint8(c, lo=0.0) for c in conds]
    ious = [region_iou(a.mean(-1) > 127, b.mean(-1) > 127) for a, b in zip(outlines, back)]
    result = {
        "vae": str(vae),
        "n": n,
        "outline_iou": float(np.mean(ious)),
        "outline_iou_median": float(np.median(ious)),
    }
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / "conditions.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [np.concatenate(outlines[:8], 1), np.concatenate(back[:8], 1)]
    Image.fromarray(np.concatenate(rows, 0)).save(work / "results" / "conditions.png")
    print(json.dumps(result))


def _table(results: dict[str, Any]) -> None:
    keys = ["iou", "shape_iou", "colour_accuracy", "shape_colour_ok"]
    print("| model, test set | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, summary in results.items():
        print(f"| {name} | " + " | ".join(f"{summary.get(k, float('nan')):.3f}" for k in keys) + " |")


def stage_evaluate(work: Path) -> None:
    models = {
        "unet": (
            work / "runs/unet-base/final/base.safetensors",
            work / "runs/unet/final/controlnet.safetensors",
            1.5,
        ),
        "flux": (
            flux_base(work),
            work / "runs/flux-cn/final/controlnet.safetensors",
            None,  # the base's own guidance
        ),
    }
    results: dict[str, Any] = {}
    for model, (base, cn, guidance) in models.items():
        if not Path(cn).is_file():
            print(f"skipping {model}: no {cn}")
            continue
        g = "" if guidance is None else f"--guidance {guidance}"
        for data in ("test", "test-stars"):
            args = f"--base {base} --controlnet {cn} {g} {S['eval']}"
            results[f"{model} {data}"] = _eval(work, f"{model}-{data}", data, args)
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / "outlines.json").write_text(json.dumps(results, indent=2) + "\n")
    _table(results)


def stage_claims(work: Path) -> None:
    """Claims 2 and 4 on the transformer, beside the UNet's: flux-cn's held-out IoU against its
    step (the sudden-convergence step is where it first crosses 0.6), and a twin run with no empty
    prompts; both scored on the test set with the prompt and with none (free IoU: the shape
    whatever its colours). On flux-tiny's base (:func:`flux_base`); whichever of the two runs is
    not trained yet trains here, side by side."""
    import csv

    from controlnet.plots import line_plot

    base = flux_base(work)
    runs = {"flux-cn": _flux_cn_args(work, base), "flux-cn-no-drop": _flux_cn_args(work, base, NO_DROP)}
    _train_side_by_side(work, runs, cache=work / "cache-flux")
    results: dict[str, Any] = {}
    for name in ("flux-cn", "flux-cn-no-drop"):
        cn = work / "runs" / name / "final/controlnet.safetensors"
        for setting in ("user", "none"):
            args = f"--base {base} --controlnet {cn} --prompt-setting {setting} {S['eval']}"
            results[f"{name} {setting}"] = _eval(work, f"claims-{name}-{setting}", "test", args)
        converged = json.loads((work / "runs" / name / "run.json").read_text()).get("converged_at")
        results[f"{name} converged_at"] = converged

    def curve(name: str) -> tuple[list[float], list[float]]:
        with open(work / "runs" / name / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["name"] == "score/shape_iou"]
        return [int(r["step"]) for r in rows], [float(r["value"]) for r in rows]

    curves = {
        n: curve(n)
        for n in ("flux-cn", "flux-cn-no-drop", "unet")
        if (work / "runs" / n / "metrics.csv").is_file()
    }
    line_plot(curves, work / "results/convergence-outlines.png", title="held-out shape IoU (16 validation outlines)",
              ylabel="shape IoU", hlines={"threshold 0.6": 0.6})  # fmt: skip
    (work / "results" / "claims.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def stage_identity(work: Path) -> None:
    """Claim 1 on the UNet and on the transformer: with its zero layers at zero, a fresh ControlNet
    leaves the base's samples bitwise as they were - 16 test outlines (DDIM at guidance 9 for the
    UNet, Euler at guidance 3.5 for flux-tiny), with the ControlNet and without. The transformer is
    flux-tiny's base as :func:`flux_base` finds it, or, where there is none, fresh from its
    architecture (the claim is about the structure, not the weights: a fresh base is noted as such)."""
    import numpy as np

    from controlnet.data import open_dataset
    from controlnet.evaluation.evaluate import EvalConfig, evaluate
    from controlnet.formats import load_base
    from controlnet.formats.dit_fresh import fresh_dit_base
    from controlnet.training.recipes import architecture

    trained = flux_base(work)
    flux = (
        load_base(trained) if trained.is_file() else fresh_dit_base(architecture("flux-tiny")["base"], seed=0)
    )
    bases = {"unet": (load_base(bundled_path(BUNDLED_BASE)), "fill50k-tiny", "trained (bundled)"),
             "flux-tiny": (flux, "flux-tiny", "trained" if trained.is_file() else "fresh")}  # fmt: skip
    stage_data(work, ("test",))  # the one set this stage reads
    test = open_dataset(work / "test")
    results = {}
    for name, (base, arch, weights) in bases.items():
        cn = base.new_controlnet(architecture(arch).get("controlnet"))
        settings = {"sampler": "euler", "guidance": 3.5} if name == "flux-tiny" else {"guidance": 9.0}
        cfg = EvalConfig(
            n=min(16, len(test)), steps=int(S["eval"].split()[-1]), batch=16, metric="outlines", **settings
        )
        with_cn = evaluate(base, cn, test, cfg, progress=False)
        alone = evaluate(base, None, test, cfg, progress=False)
        same = all(np.array_equal(a[1], b[1]) for a, b in zip(with_cn.examples, alone.examples))
        results[name] = {"samples": cfg.n, "base weights": weights, "bitwise_identical": same}
        print(f"zero-init identity, {name} ({weights} base), {cfg.n} samples: bitwise identical = {same}")
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / "identity.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "stage", choices=["data", "unet", "flux", "ceiling", "conditions", "evaluate", "claims", "identity"]
    )
    p.add_argument("--work", default="work/outlines")
    p.add_argument("--smoke", action="store_true", help="toy scale on a CPU, to check the script")
    args = p.parse_args()
    if args.smoke:
        S.update(SMOKE)
    work = Path(args.work).resolve()
    if args.stage not in ("data", "identity", "conditions"):
        stage_data(work, ("test", "test-stars"))  # (a stage that trains makes the training set, `_train`)
    stages = {
        "data": stage_data,
        "unet": stage_unet,
        "flux": stage_flux,
        "ceiling": stage_ceiling,
        "conditions": stage_conditions,
        "evaluate": stage_evaluate,
        "claims": stage_claims,
    }
    {**stages, "identity": stage_identity}[args.stage](work)


if __name__ == "__main__":
    main()
