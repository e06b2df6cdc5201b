"""The bundled model and the paper's claims at small scale, on the fill50k world.

Every model is made by a `controlnet` command (printed, logged, and quoted in docs/results.md);
this script only runs them in order (independent trainings in parallel on one GPU) and evaluates.

    python experiments/fill50k.py base   --work WORK [--given RUN=FILE]  # data, VAE, base (GPU)
    python experiments/fill50k.py claims --work WORK               # ControlNet + ablations (GPU)
    python experiments/fill50k.py bundle --work WORK [--init|--more FILE] # the main ControlNet, longer (GPU)
    python experiments/fill50k.py identity --work WORK             # zero-init identity     (CPU is fine)
    python experiments/fill50k.py ceiling --work WORK              # IoU of targets, VAE    (CPU is fine)
    python experiments/fill50k.py guidance --work WORK             # bundled model's scale  (CPU, ~45 min)
    python experiments/fill50k.py plots --work WORK                # IoU against step       (CPU)

WORK holds data, runs and results; results land in WORK/results/. --smoke runs everything at toy
scale on a CPU (to check the script; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
S: dict[str, Any] = {
    "size": 128,  # image side; latents are 16x16
    "n_train": 50_000,
    "n_small": 1_000,
    "n_medium": 10_000,
    "n_eval": 500,
    "n_val": 150,  # validation pairs (seed 2) on which the bundled model's guidance scale is chosen
    "guidance_scales": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0, 13.0],
    "vae": "--steps 2500 --batch-size 64 --lr 3e-4",
    # a model this small is bound by launching kernels, not by arithmetic: a step costs about the
    # same at batch 1024 as at 256, so large batches and fewer steps
    "base": "--steps 1200 --batch-size 1024 --lr 6e-4 --warmup-steps 120",
    # then from that export, a second run ending on a cosine decay (the first session stopped there)
    "base_more": "--steps 1800 --batch-size 1024 --lr 6e-4 --warmup-steps 50 --lr-schedule cosine",
    # and a third, from the second's export (a later session): prompt colours were still being learned
    "base_third": "--steps 3000 --batch-size 1024 --lr 3e-4 --warmup-steps 100 --lr-schedule cosine",
    # a fourth with offset noise: the background colour had followed the starting noise, not the
    # prompt (at 16x16 latents the last timestep still shows an image's mean colour)
    "base_fourth": "--steps 3000 --batch-size 1024 --lr 3e-4 --warmup-steps 100 --lr-schedule cosine "
    "--noise-offset 0.25",
    # every ControlNet variant: a fair comparison (offset noise as the base model was last trained)
    "cn": "--steps 1500 --batch-size 256 --lr 2e-4 --noise-offset 0.25",
    # the bundled ControlNet: the main variant's export, trained on (it had only just converged)
    "cn_more": "--steps 2000 --batch-size 256 --lr 2e-4",
    # a ControlNet carried over to a base model trained further (``bundle --init``)
    "cn_rebase": "--steps 2000 --batch-size 256 --lr 2e-4 --warmup-steps 100 --lr-schedule cosine "
    "--noise-offset 0.25",
    # the bundled ControlNet trained further on the same base (``bundle --more``): IoU was still rising
    "cn_continue": "--steps 3000 --batch-size 256 --lr 1e-4 --warmup-steps 100 --lr-schedule cosine "
    "--noise-offset 0.25",
    "device": "--mixed-precision bfloat16 --num-workers 8",
    "validate_every": 50,
    "threshold": 0.6,
    "cache_workers": 8,
    "parallel_workers": 2,  # data-loader workers per run when several runs share the machine
}
SMOKE = {
    "size": 64, "n_train": 80, "n_small": 24, "n_medium": 40, "n_eval": 8, "n_val": 4,
    "guidance_scales": [1.0, 9.0],
    "vae": "--steps 4 --batch-size 8 --lr 3e-4", "base": "--steps 4 --batch-size 8 --lr 4e-4",
    "base_more": "--steps 4 --batch-size 8 --lr 4e-4 --lr-schedule cosine",
    "base_third": "--steps 4 --batch-size 8 --lr 2e-4 --lr-schedule cosine",
    "base_fourth": "--steps 4 --batch-size 8 --lr 2e-4 --lr-schedule cosine --noise-offset 0.25",
    "cn": "--steps 4 --batch-size 8 --lr 1e-4 --noise-offset 0.25", "cn_more": "--steps 4 --batch-size 8 --lr 1e-4",
    "cn_rebase": "--steps 4 --batch-size 8 --lr 1e-4 --lr-schedule cosine --noise-offset 0.25",
    "cn_continue": "--steps 4 --batch-size 8 --lr 1e-4 --lr-schedule cosine --noise-offset 0.25", "device": "--cpu --mixed-precision float32 --num-workers 0",
    "validate_every": 2, "parallel_workers": 0, "cache_workers": 0,
}  # fmt: skip
VARIANTS = {  # name: (data set, extra options)
    "controlnet": ("fill50k", ""),
    "adapter": ("fill50k", "--objective adapter"),  # a T2I-Adapter: the same loss, data and budget
    "gaussian": ("fill50k", "--objective gaussian"),
    "lite": ("fill50k", "--objective lite"),
    "concat": ("fill50k", "--objective concat"),
    "no-dropout": ("fill50k", "--empty-prompt-prob 0"),
    "data-small": ("fill-small", ""),
    "data-medium": ("fill-medium", ""),
}


def cli(args: str) -> list[str]:
    return [sys.executable, "-m", "controlnet.cli", *shlex.split(args)]


def start(args: str, log: Path | None = None, threads: int | None = None) -> subprocess.Popen:
    """Start ``controlnet ARGS`` (output to ``log``), printing the command as one would type it;
    ``threads`` caps its CPU threads (runs that share a machine must not oversubscribe it)."""
    print(f"$ controlnet {args}", flush=True)
    out = open(log, "w") if log else None  # noqa: SIM115 (the child holds it)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.Popen(cli(args), stdout=out, stderr=subprocess.STDOUT if out else None, cwd=ROOT, env=env)


@contextlib.contextmanager
def signals_left_to_children() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM (sent to the whole process group, as a terminal or ``timeout``
    does) are left to the children: a training run stops after its step with a checkpoint."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def wait_for(children: list[subprocess.Popen]) -> list[int]:
    """Wait for every child (signals left to them); their exit codes."""
    with signals_left_to_children():
        return [child.wait() for child in children]


def run(args: str, log: Path | None = None) -> None:
    """Run ``controlnet ARGS`` to its end. Ctrl-C or SIGTERM (sent to the whole process group, as a
    terminal or ``timeout`` does) is left to it: a training run stops after its step with a
    checkpoint, and this script then stops with it."""
    t0 = time.time()
    (rc,) = wait_for([start(args, log)])
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if rc != 0:
        raise SystemExit(f"failed: controlnet {args}\n{log.read_text()[-3000:] if log else ''}")


def loop(steps: str, validate_every: int) -> str:
    return (f"{steps} {S['device']} --validate-every {validate_every} --validation-count 16 "
            f"--checkpoint-every 500 --log-every 50 --quiet")  # fmt: skip


def fill50k_data(work: Path, name: str, n: int, seed: int) -> None:
    """``WORK/NAME``: ``n`` fill50k pairs at the recipe's size (seed 0: training, 1: test, 2:
    validation)."""
    run(f"data fill50k --out {work}/{name} --n {n} --size {S['size']} --seed {seed} --quiet")


def build_cache(work: Path, data: str, base: str) -> None:
    run(f"data cache {work}/{data} --base {base} --out {work}/cache-{data} --num-workers {S['cache_workers']} --quiet",
        work / "logs" / f"cache-{data}.log")  # fmt: skip


def control_args(work: Path, base: str, data: str, name: str, steps: str, every: int) -> str:
    """``controlnet train`` arguments of a ControlNet run on a cached data set, IoU-validated."""
    return (f"train --base {base} --data {work}/{data} --cache {work}/cache-{data} --out {work}/runs/{name} "
            f"--score-name iou --score-threshold {S['threshold']} {loop(steps, every)}")  # fmt: skip


def stage_base(work: Path, given: dict[str, Path]) -> None:
    """Data, VAE, then the base model in four runs, each from the previous one's export (the runs
    fell in different sessions); ``given`` maps a run's name to an earlier session's export of it,
    which is used instead of training it again (and the runs before it are skipped)."""
    # (run folder, its options); each base run starts from the export of the run before it
    runs = [("vae", S["vae"]), ("base-first", S["base"]), ("base-second", S["base_more"]),
            ("base-third", S["base_third"]), ("base", S["base_fourth"])]  # fmt: skip
    names = [name for name, _ in runs]
    if unknown := sorted(set(given) - set(names)):
        raise SystemExit(f"--given: unknown runs {unknown}; choose from {names}")
    t0 = time.time()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    fill50k_data(work, "fill50k", S["n_train"], 0)
    fill50k_data(work, "fill50k-test", S["n_eval"], 1)
    skip = max((names.index(name) for name in given), default=-1)
    for i, (name, steps) in enumerate(runs):
        if i < skip:
            continue
        if i == skip:  # this run's export, from an earlier session
            (work / name / "final").mkdir(parents=True, exist_ok=True)
            shutil.copy(given[name], work / name / "final/base.safetensors")
            continue
        source = "--objective vae --arch fill50k-tiny" if name == "vae" else \
            f"--objective base --base {work}/{names[i - 1]}/final/base.safetensors"  # fmt: skip
        cache = "" if name == "vae" else f"--cache {work}/cache-{name}"
        run(f"train {source} --data {work}/fill50k --out {work}/{name} {cache} {loop(steps, 600)}",
            work / "logs" / f"{name}.log")  # fmt: skip
    print(f"base stage done in {time.time() - t0:.0f} s")


def stage_claims(work: Path, names: list[str], steps: int | None = None) -> None:
    """Train the chosen ControlNet variants (in parallel when several; ``steps`` instead of the
    recipe's 1,500), then evaluate them."""
    t0 = time.time()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = f"{work}/base/final/base.safetensors"
    sizes = {"fill-small": S["n_small"], "fill-medium": S["n_medium"]}
    datas = sorted({VARIANTS[n][0] for n in names})
    for data in datas:  # the smaller sets are the first n of the same 50k; caches built before runs read them
        if data in sizes:
            fill50k_data(work, data, sizes[data], 0)
        build_cache(work, data, base)
    procs = {}
    threads = max(1, (os.cpu_count() or 2) // len(names))
    recipe = re.sub(r"--steps \d+", f"--steps {steps}", S["cn"]) if steps else S["cn"]
    for name in names:
        data, extra = VARIANTS[name]
        every = S["validate_every"] if name == "controlnet" else 500
        workers = f"--num-workers {S['parallel_workers']}" if len(names) > 1 else ""
        args = f"{control_args(work, base, data, name, recipe, every)} --arch fill50k-tiny {workers} {extra}"
        procs[name] = (start(args, logs / f"{name}.log", threads), logs / f"{name}.log")
    failed = [n for n, (p, _) in procs.items() if p.wait() != 0]
    for n in failed:
        print(f"--- {n} failed:\n{procs[n][1].read_text()[-3000:]}")
    print(f"trainings done in {time.time() - t0:.0f} s", flush=True)
    evaluate_claims(work, names)
    if failed:
        raise SystemExit(f"failed runs: {failed}")
    print(f"claims stage done in {time.time() - t0:.0f} s")


def stage_bundle(work: Path, first: Path | None, init: Path | None, more: Path | None) -> None:
    """The bundled ControlNet: the main variant's export (``first``: from an earlier session,
    with its run.json beside it) trained on; or ``init``: an earlier bundled ControlNet carried
    over to a base model trained further; or ``more``: the bundled ControlNet trained further on
    the same base. Then evaluate it."""
    t0 = time.time()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if first is not None:
        (work / "runs/controlnet/final").mkdir(parents=True, exist_ok=True)
        shutil.copy(first, work / "runs/controlnet/final/controlnet.safetensors")
        shutil.copy(first.parent / "run.json", work / "runs/controlnet/run.json")
    base = f"{work}/base/final/base.safetensors"
    build_cache(work, "fill50k", base)
    start_from = init or more or f"{work}/runs/controlnet/final/controlnet.safetensors"
    steps = S["cn_rebase"] if init else S["cn_continue"] if more else S["cn_more"]
    args = control_args(work, base, "fill50k", "bundled", steps, 2 * S["validate_every"])
    run(f"{args} --init-controlnet {start_from}", work / "logs/bundled.log")
    # the convergence plot draws the bundled run as the main run's continuation only when it is one
    (work / "runs/bundled/started_from.json").write_text(json.dumps({"path": str(start_from), "main_run": not (init or more)}))
    print(f"trainings done in {time.time() - t0:.0f} s", flush=True)
    evaluate_claims(work, ["bundled"])


def evaluate_claims(work: Path, names: list[str] | None = None) -> None:
    """Evaluate the named runs (all that exist when None) and the base model alone on the held-out
    test conditions; merge the results into results/claims.json."""
    import torch
    from safetensors.torch import load_file

    from controlnet.data import open_dataset
    from controlnet.evaluation.evaluate import EvalConfig, evaluate, write_report
    from controlnet.families.sd.controlnet import ControlNetConfig
    from controlnet.formats import load_base, load_controlnet
    from controlnet.generation.sampling import denoise
    from controlnet.training.ablations import ConcatUNet, LiteControlNet
    from controlnet.training.recipes import architecture

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(work / "base/final/base.safetensors").to(device)
    test = open_dataset(work / "fill50k-test")
    out = work / "results"
    results: dict[str, Any] = {}

    def record(name: str, res: Any) -> None:
        write_report(res, out / name, title=name)
        results[name] = res.summary
        print(name, {k: round(v, 4) for k, v in res.summary.items()}, flush=True)

    def trained(name: str) -> dict[str, torch.Tensor]:  # an ablation's exported tensors, module prefix off
        return {k.split(".", 1)[1]: v for k, v in load_file(work / "runs" / name / "final" / f"{name}.safetensors").items()}

    def done(name: str) -> bool:
        return (names is None or name in names) and (work / "runs" / name / "run.json").exists() and \
            any((work / "runs" / name / "final").glob("*.safetensors"))  # fmt: skip

    cfg = EvalConfig(n=S["n_eval"], steps=20, guidance=9.0, batch=min(100, S["n_eval"]))
    record("base-alone", evaluate(base, None, test, cfg, progress=False))
    blank = BlankConditions(test)
    for name in ("bundled", "controlnet", "adapter", "gaussian", "no-dropout", "data-small", "data-medium"):
        if not done(name):
            continue
        file = "adapter.safetensors" if name == "adapter" else "controlnet.safetensors"
        cn = load_controlnet(work / "runs" / name / "final" / file).to(device).eval()
        record(name, evaluate(base, cn, test, cfg, progress=False))
        if name in ("bundled", "controlnet", "no-dropout"):  # the paper's no-prompt setting
            record(f"{name}-no-prompt", evaluate(base, cn, test, replace(cfg, prompt_setting="none"), progress=False))
        if name in ("controlnet", "adapter"):  # what it does to the base given a blank (black) condition
            res = evaluate(base, cn, blank, cfg, progress=False)
            results[f"{name}-blank-condition"] = {k: v for k, v in res.summary.items() if k.startswith("free_")}
    if done("lite"):
        lite = LiteControlNet(base.unet, ControlNetConfig.from_dict(architecture("fill50k-tiny")["controlnet"]))
        lite.load_state_dict(trained("lite"))
        record("lite", evaluate(base, lite.to(device).eval(), test, cfg, progress=False))
    if done("concat"):
        concat = ConcatUNet(base.unet)
        concat.unet.load_state_dict(trained("concat"))
        concat.to(device).eval()
        concat_base = replace(base, unet=concat)

        def concat_sample(emb, neg, cond, seeds, latent):
            concat.cond = cond
            return denoise(concat_base, emb, neg, [], steps=cfg.steps, guidance=cfg.guidance, seeds=seeds,
                           latent_size=latent, progress=False).latents  # fmt: skip

        record("concat", evaluate(base, None, test, cfg, progress=False, sample_fn=concat_sample))
        # what fine-tuning did to the base model's own behaviour: prompts alone, a blank condition
        blank = evaluate(base, None, test, cfg, progress=False,
                         sample_fn=lambda e, n, c, s, lat: concat_sample(e, n, torch.zeros_like(c), s, lat))  # fmt: skip
        results["concat-no-condition"] = {k: v for k, v in blank.summary.items() if k.startswith("free_")}
    runs = {}
    for name in ("bundled", *VARIANTS):
        if done(name):
            info = json.loads((work / "runs" / name / "run.json").read_text())
            runs[name] = {k: info.get(k) for k in ("converged_at", "steps", "samples_seen", "seconds_this_session")}
            exported = next((work / "runs" / name / "final").glob("*.safetensors"))
            runs[name]["parameters"] = sum(t.numel() for t in load_file(exported).values())
    sizes = {"data-small": S["n_small"], "data-medium": S["n_medium"], "controlnet": S["n_train"]}
    path = out / "claims.json"  # runs made in several sessions add up in one file
    old = json.loads(path.read_text()) if path.exists() else {"eval": {}, "runs": {}}
    merged = {"eval": {**old["eval"], **results}, "runs": {**old["runs"], **runs}, "data_sizes": sizes}
    path.write_text(json.dumps(merged, indent=1) + "\n")


class BlankConditions:
    """A data set's items with their conditions blank (black): how a trained control model moves
    the base when it is given nothing to follow."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item["cond"] = item["cond"] * 0
        return item


def stage_speed(work: Path, names: list[str], steps: int = 300) -> None:
    """Each variant's training step alone on the machine (the claims stage runs them side by side):
    ``steps`` steps of the recipe's batch with no validation, samples/s over the run and peak
    memory, into results/speed.json."""
    base = f"{work}/base/final/base.safetensors"
    build_cache(work, "fill50k", base)
    recipe = re.sub(r"--steps \d+", f"--steps {steps}", S["cn"])
    speed = {}
    for name in names:
        data, extra = VARIANTS[name]
        out = work / "speed" / name
        run(f"train --base {base} --data {work}/{data} --cache {work}/cache-{data} --out {out} --arch fill50k-tiny "
            f"{recipe} {S['device']} --validation-count 0 --log-every {max(1, steps // 3)} --quiet {extra}",
            work / "logs" / f"speed-{name}.log")  # fmt: skip
        info = json.loads((out / "run.json").read_text())
        speed[name] = {"samples_per_s": info["samples_per_s_this_session"], "steps": info["steps"],
                       "max_mem_gib": info["last_metrics"].get("max_mem_gib")}  # fmt: skip
        print(name, speed[name], flush=True)
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results/speed.json").write_text(json.dumps(speed, indent=1) + "\n")


def stage_plots(work: Path) -> None:
    """Claim 2 as a picture: held-out IoU against ControlNet training step, the main variant's run
    (and the bundled run, when it went on from it), and the variants' runs."""
    import csv

    from controlnet.plots import line_plot

    def series(name: str, metric: str, offset: int = 0) -> tuple[list[float], list[float]]:
        path = work / "runs" / name / "metrics.csv"
        if not path.exists():
            return [], []
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["name"] == metric]
        return [int(r["step"]) + offset for r in rows], [float(r["value"]) for r in rows]

    curves = {"main run": series("controlnet", "score/iou")}
    origin = work / "runs/bundled/started_from.json"
    if origin.exists() and json.loads(origin.read_text())["main_run"]:
        first = json.loads((work / "runs/controlnet/run.json").read_text())["steps"]
        curves["bundled (went on)"] = series("bundled", "score/iou", first)
    curves.update({n: series(n, "score/iou") for n in VARIANTS if n != "controlnet"})
    curves = {k: v for k, v in curves.items() if v[0]}
    out = line_plot(curves, work / "results/convergence.png", title="held-out IoU (16 validation conditions)",
                    ylabel="IoU", hlines={f"threshold {S['threshold']}": S["threshold"]})  # fmt: skip
    print(f"wrote {out}")


def stage_ceiling(work: Path) -> None:
    """What IoU the test set allows: the score of the test targets themselves (their circles
    against the filled outlines differ at the edge pixels) and of the targets after a round trip
    through the base's VAE, which every generated image passes through."""
    import numpy as np
    import torch

    from controlnet.data import open_dataset
    from controlnet.evaluation.evaluate import fill50k_scores
    from controlnet.formats import load_base
    from controlnet.imageio import to_uint8

    base = load_base(work / "base/final/base.safetensors", dtype=torch.float32)
    test = open_dataset(work / "fill50k-test")
    scores: dict[str, list[float]] = {"targets": [], "vae_round_trip": []}
    for start in range(0, len(test), 50):
        items = [test[i] for i in range(start, min(start + 50, len(test)))]
        targets = torch.stack([it["target"] for it in items])
        decoded = base.decode_latents(base.encode_images(targets, torch.Generator().manual_seed(0)))
        for it, target, image in zip(items, targets, decoded):
            cond = to_uint8(it["cond"], lo=0.0)
            scores["targets"].append(fill50k_scores(to_uint8(target), cond, it["prompt"])["iou"])
            scores["vae_round_trip"].append(fill50k_scores(to_uint8(image), cond, it["prompt"])["iou"])
    summary = {k: {"iou": float(np.mean(v)), "iou_median": float(np.median(v))} for k, v in scores.items()}
    out = work / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps({"pairs": len(test), **summary}, indent=1) + "\n")
    print(f"IoU ceiling over {len(test)} test pairs: {summary}")


def stage_guidance(work: Path) -> None:
    """The shipped model's guidance scale: each scale of S["guidance_scales"] scored on a
    validation split (seed 2; the test pairs are seed 1), then the best one and SD's usual 9 on the
    test pairs. ``controlnet eval`` commands on the bundled files; an evaluation whose results
    exist is not run again."""
    from controlnet.bundled import BUNDLED_GUIDANCE
    from controlnet.plots import line_plot

    out = work / "results" / "guidance"
    for data, n, seed in (("fill50k-val", S["n_val"], 2), ("fill50k-test", S["n_eval"], 1)):
        if not (work / data).exists():
            fill50k_data(work, data, n, seed)

    def scores(data: str, n: int, scale: float) -> dict[str, float]:
        dest = out / f"{data.removeprefix('fill50k-')}-g{scale:g}"
        if not (dest / "results.json").exists():
            run(f"eval --data {work}/{data} --out {dest} --n {n} --guidance {scale:g} --quiet")
        return json.loads((dest / "results.json").read_text())["summary"]

    val = {g: scores("fill50k-val", S["n_val"], g) for g in S["guidance_scales"]}
    best = max(val, key=lambda g: (val[g]["iou"], val[g]["colour_accuracy"]))
    test = {g: scores("fill50k-test", S["n_eval"], g) for g in sorted({best, 9.0})}
    keys = ("iou", "iou_median", "colour_accuracy", "free_iou")
    summary = {
        "validation_pairs": S["n_val"],
        "test_pairs": S["n_eval"],
        "best_on_validation": best,
        "shipped_default": BUNDLED_GUIDANCE,
        "validation": {f"{g:g}": {k: val[g][k] for k in keys} for g in val},
        "test": {f"{g:g}": {k: test[g][k] for k in keys} for g in test},
    }
    (out / "guidance.json").write_text(json.dumps(summary, indent=1) + "\n")
    gs = list(val)
    line_plot({"IoU": (gs, [val[g]["iou"] for g in gs]),
               "colour accuracy": (gs, [val[g]["colour_accuracy"] for g in gs])},
              out / "guidance.png", title=f"bundled model on {S['n_val']} validation pairs, 20 DDIM steps",
              xlabel="guidance scale", ylabel="score", hlines={"target 0.90": 0.9})  # fmt: skip
    side_by_side(out / "test-g9" / "examples.png", out / f"test-g{best:g}" / "examples.png",
                 f"above: guidance 9; below: guidance {best:g} (the same test pairs and seeds)",
                 out / "examples-g9-vs-best.png")  # fmt: skip
    print(json.dumps(summary, indent=1))
    if best != BUNDLED_GUIDANCE:
        print(f"note: the best scale here ({best:g}) is not the shipped default ({BUNDLED_GUIDANCE:g})")


def side_by_side(top: Path, bottom: Path, caption: str, path: Path, height: int = 266) -> None:
    """The first ``height`` pixel rows of two example grids, one above the other, captioned."""
    from PIL import Image, ImageDraw

    a, b = Image.open(top), Image.open(bottom)
    h = min(height, a.height, b.height)
    both = Image.new("RGB", (max(a.width, b.width), 2 * h + 24), "white")
    both.paste(a.crop((0, 0, a.width, h)), (0, 0))
    both.paste(b.crop((0, 0, b.width, h)), (0, h + 24))
    ImageDraw.Draw(both).text((4, h + 6), caption, fill="black")
    both.save(path, optimize=True)


def stage_identity(work: Path) -> None:
    """Claim 1: with its zero convolutions at zero, the controlled model's samples ARE the base's."""
    import numpy as np

    from controlnet.data import open_dataset
    from controlnet.evaluation.evaluate import EvalConfig, evaluate
    from controlnet.families.sd.controlnet import ControlNet, ControlNetConfig
    from controlnet.formats import load_base
    from controlnet.training.recipes import architecture

    base = load_base(work / "base/final/base.safetensors")
    test = open_dataset(work / "fill50k-test")
    cn = ControlNet.from_unet(base.unet, ControlNetConfig.from_dict(architecture("fill50k-tiny")["controlnet"]))
    cfg = EvalConfig(n=16, steps=20, batch=16)
    with_cn = evaluate(base, cn, test, cfg, progress=False)
    alone = evaluate(base, None, test, cfg, progress=False)
    same = all(np.array_equal(a[1], b[1]) for a, b in zip(with_cn.examples, alone.examples))
    out = work / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "identity.json").write_text(json.dumps({"samples": 16, "bitwise_identical": same}) + "\n")
    print(f"zero-init identity over 16 samples: bitwise identical = {same}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "stage",
        choices=["base", "claims", "bundle", "evaluate", "identity", "ceiling", "guidance", "plots", "speed"],
    )
    p.add_argument("--work", default="work/fill50k")
    p.add_argument("--given", action="append", default=[], metavar="RUN=FILE",
                   help="base stage: an earlier session's export of this run (vae, base-first, ..., base: "
                        "the shipped base, to run the claims on it)")  # fmt: skip
    p.add_argument("--first", help="bundle stage: the main variant's export from an earlier session")
    p.add_argument("--init", help="bundle stage: carry this bundled ControlNet over to the current base")
    p.add_argument("--more", help="bundle stage: train this bundled ControlNet further on the same base")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"claims stage: which of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, help="claims stage: train this many steps instead of the recipe's")
    p.add_argument("--smoke", action="store_true", help="toy scale on a CPU, to check the script")
    args = p.parse_args()
    if args.smoke:
        S.update(SMOKE)
    work = Path(args.work).resolve()
    if args.stage == "base":
        pairs = [g.split("=", 1) for g in args.given]
        if any(len(pair) != 2 for pair in pairs):
            p.error("--given takes RUN=FILE")
        stage_base(work, {name: Path(f).resolve() for name, f in pairs})
    else:
        names = args.variants.split(",")
        if unknown := sorted(set(names) - set(VARIANTS)):
            p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        if args.stage == "claims":
            stage_claims(work, names, args.steps)
        elif args.stage == "speed":
            stage_speed(work, names, *([args.steps] if args.steps else []))
        elif args.stage == "bundle":
            starts = [args.first, args.init, args.more]
            if sum(f is not None for f in starts) > 1:
                p.error("bundle: give at most one of --first, --init, --more")
            stage_bundle(work, *(Path(f).resolve() if f else None for f in starts))
        else:
            stages = {"evaluate": evaluate_claims, "identity": stage_identity, "ceiling": stage_ceiling,
                      "guidance": stage_guidance, "plots": stage_plots}  # fmt: skip
            stages[args.stage](work)


if __name__ == "__main__":
    main()
