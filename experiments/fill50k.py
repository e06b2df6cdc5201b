"""The bundled model and the paper's claims at small scale, on the fill50k world.

Every model is made by a `controlnet` command (printed, logged, and quoted in docs/results.md);
this script only runs them in order (independent trainings in parallel on one GPU) and evaluates.

    python experiments/fill50k.py base   --work WORK      # data, VAE, base model     (GPU, ~8 min)
    python experiments/fill50k.py claims --work WORK      # ControlNet + ablations    (GPU, ~8 min)
    python experiments/fill50k.py identity --work WORK    # zero-init identity        (CPU is fine)

WORK holds data, runs and results; results land in WORK/results/*.json and WORK/results/*.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "controlnet.cli"]
SIZE = 128

# base model: VAE then UNet + text encoder, from scratch
VAE_STEPS, VAE_BATCH, VAE_LR = 2500, 64, 3e-4
BASE_STEPS, BASE_BATCH, BASE_LR = 4000, 256, 4e-4
# ControlNets (all variants share these, so the comparison is fair)
CN_STEPS, CN_BATCH, CN_LR = 3000, 64, 1e-4
VALIDATE_EVERY, SCORE_THRESHOLD = 100, 0.6
EVAL_N = 500
N_TRAIN, DATA_SIZES = 50000, (1000, 10000)


def smoke() -> None:
    """Tiny numbers: check the whole script on a CPU in a few minutes (results mean nothing)."""
    global SIZE, VAE_STEPS, VAE_BATCH, BASE_STEPS, BASE_BATCH, CN_STEPS, CN_BATCH, VALIDATE_EVERY, EVAL_N
    global N_TRAIN, DATA_SIZES
    SIZE, VAE_STEPS, VAE_BATCH, BASE_STEPS, BASE_BATCH = 64, 4, 8, 4, 8
    CN_STEPS, CN_BATCH, VALIDATE_EVERY, EVAL_N, N_TRAIN, DATA_SIZES = 4, 8, 2, 8, 80, (24, 40)


def sh(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start a command (stdout+stderr to ``log``); print it as it would be typed."""
    print(
        "$ " + " ".join(shlex.quote(c) for c in cmd[2:] if c) if cmd[:3] == CLI else " ".join(cmd), flush=True
    )
    out = open(log, "w") if log else None  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=out or None, stderr=subprocess.STDOUT if out else None, cwd=ROOT)


def run(cmd: list[str], log: Path | None = None) -> None:
    t0 = time.time()
    rc = sh(cmd, log).wait()
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if rc != 0:
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")


def wait_all(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    failed = []
    for name, (p, log) in procs.items():
        if p.wait() != 0:
            failed.append(name)
            print(f"--- {name} failed; log tail:\n{log.read_text()[-3000:]}")
    if failed:
        raise SystemExit(f"failed runs: {failed}")


def common(steps: int, batch: int, lr: float, validate_every: int) -> list[str]:
    # the smoke scale runs on a CPU, in float32
    device = (
        ["--cpu", "--num-workers", "0", "--mixed-precision", "no"]
        if SIZE < 128
        else ["--num-workers", "6", "--mixed-precision", "bf16"]
    )
    return [
        *device,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--lr",
        str(lr),
        "--validate-every",
        str(validate_every),
        "--validation-count",
        "16",
        "--checkpoint-every",
        str(steps),
        "--quiet",
        "--log-every",
        str(min(50, steps)),
    ]


def stage_base(work: Path) -> None:
    t0 = time.time()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run(
        [
            *CLI,
            "data",
            "fill50k",
            "--out",
            str(work / "fill50k"),
            "--n",
            str(N_TRAIN),
            "--size",
            str(SIZE),
            "--seed",
            "0",
            "--quiet",
        ]
    )
    run(
        [
            *CLI,
            "data",
            "fill50k",
            "--out",
            str(work / "fill50k-test"),
            "--n",
            str(EVAL_N),
            "--size",
            str(SIZE),
            "--seed",
            "1",
            "--quiet",
        ]
    )
    run(
        [
            *CLI,
            "train",
            "--objective",
            "vae",
            "--arch",
            "fill50k-tiny",
            "--data",
            str(work / "fill50k"),
            "--out",
            str(work / "vae"),
            *common(VAE_STEPS, VAE_BATCH, VAE_LR, 1000),
        ],
        logs / "vae.log",
    )
    run(
        [
            *CLI,
            "train",
            "--objective",
            "base",
            "--base",
            str(work / "vae/final/base.safetensors"),
            "--data",
            str(work / "fill50k"),
            "--out",
            str(work / "base"),
            "--cache",
            str(work / "cache-vae"),
            "--warmup-steps",
            "500",
            *common(BASE_STEPS, BASE_BATCH, BASE_LR, 1000),
        ],
        logs / "base.log",
    )
    print(f"base stage done in {time.time() - t0:.0f} s")


def _cn_cmd(work: Path, name: str, data: str, extra: list[str], validate_every: int) -> list[str]:
    return [
        *CLI,
        "train",
        "--base",
        str(work / "base/final/base.safetensors"),
        "--arch",
        "fill50k-tiny",
        "--data",
        str(work / data),
        "--out",
        str(work / "runs" / name),
        "--cache",
        str(work / f"cache-{data}"),
        "--score-name",
        "iou",
        "--score-threshold",
        str(SCORE_THRESHOLD),
        *common(CN_STEPS, CN_BATCH, CN_LR, validate_every),
        *extra,
    ]


def stage_claims(work: Path) -> None:
    t0 = time.time()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    small, medium = DATA_SIZES
    for name, n in (("fill-small", small), ("fill-medium", medium)):  # the first n pairs of the 50k set
        run(
            [
                *CLI,
                "data",
                "fill50k",
                "--out",
                str(work / name),
                "--n",
                str(n),
                "--size",
                str(SIZE),
                "--seed",
                "0",
                "--quiet",
            ]
        )
    runs = {
        "controlnet": ("fill50k", [], VALIDATE_EVERY),
        "gaussian": ("fill50k", ["--objective", "gaussian"], 500),
        "lite": ("fill50k", ["--objective", "lite"], 500),
        "concat": ("fill50k", ["--objective", "concat"], 500),
        "no-dropout": ("fill50k", ["--empty-prompt-prob", "0"], 500),
        "data-small": ("fill-small", [], 500),
        "data-medium": ("fill-medium", [], 500),
    }
    # build each data set's latent cache once, before the parallel runs read it
    for data in sorted({d for d, _, _ in runs.values()}):
        run(
            [
                *CLI,
                "data",
                "cache",
                str(work / data),
                "--base",
                str(work / "base/final/base.safetensors"),
                "--out",
                str(work / f"cache-{data}"),
                "--quiet",
            ],
            logs / f"cache-{data}.log",
        )
    procs = {}
    for name, (data, extra, every) in runs.items():
        log = logs / f"{name}.log"
        procs[name] = (sh(_cn_cmd(work, name, data, extra, every), log), log)
    wait_all(procs)
    print(f"trainings done in {time.time() - t0:.0f} s")
    evaluate_claims(work)
    print(f"claims stage done in {time.time() - t0:.0f} s")


def evaluate_claims(work: Path) -> None:
    """Evaluate every variant on the 500 held-out test conditions; write results/claims.json."""
    import torch
    from safetensors.torch import load_file

    from controlnet.ablations import ConcatUNet, LiteControlNet
    from controlnet.controlnet import ControlNetConfig
    from controlnet.data import open_dataset
    from controlnet.evaluate import EvalConfig, evaluate, write_report
    from controlnet.formats import load_base, load_controlnet
    from controlnet.recipes import architecture
    from controlnet.sampling import denoise

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(work / "base/final/base.safetensors").to(device)
    test = open_dataset(work / "fill50k-test")
    results: dict[str, Any] = {}
    out = work / "results"

    def record(name: str, res: Any) -> None:
        write_report(res, out / name, title=name)
        results[name] = res.summary
        print(name, {k: round(v, 4) for k, v in res.summary.items()}, flush=True)

    cfg = EvalConfig(n=EVAL_N, steps=20, guidance=9.0, batch=min(100, EVAL_N))
    record("base-alone", evaluate(base, None, test, cfg, progress=False))
    for name in ("controlnet", "gaussian", "no-dropout", "data-small", "data-medium"):
        cn = load_controlnet(work / "runs" / name / "final/controlnet.safetensors").to(device).eval()
        record(name, evaluate(base, cn, test, cfg, progress=False))
        if name in ("controlnet", "no-dropout"):  # the paper's no-prompt setting
            record(
                f"{name}-no-prompt",
                evaluate(
                    base, cn, test, EvalConfig(**{**cfg.__dict__, "prompt_setting": "none"}), progress=False
                ),
            )
    hint = ControlNetConfig.from_dict(architecture("fill50k-tiny")["controlnet"])
    lite = LiteControlNet(base.unet, hint)
    lite.load_state_dict(
        {k.split(".", 1)[1]: v for k, v in load_file(work / "runs/lite/final/lite.safetensors").items()}
    )
    record("lite", evaluate(base, lite.to(device).eval(), test, cfg, progress=False))

    concat = ConcatUNet(base.unet)
    state = {
        k.split(".", 1)[1]: v for k, v in load_file(work / "runs/concat/final/concat.safetensors").items()
    }
    concat.unet.load_state_dict(state)
    concat.to(device).eval()
    from dataclasses import replace as dc_replace

    concat_base = dc_replace(base, unet=concat)

    def concat_sample(emb, neg, cond, seeds, latent):
        concat.cond = cond
        return denoise(
            concat_base,
            emb,
            neg,
            [],
            steps=cfg.steps,
            guidance=cfg.guidance,
            seeds=seeds,
            latent_size=latent,
            progress=False,
        ).latents

    record("concat", evaluate(base, None, test, cfg, progress=False, sample_fn=concat_sample))

    def concat_blank(emb, neg, cond, seeds, latent):
        return concat_sample(emb, neg, torch.zeros_like(cond), seeds, latent)

    blank = evaluate(base, None, test, cfg, progress=False, sample_fn=concat_blank)
    results["concat-no-condition"] = {k: v for k, v in blank.summary.items() if k.startswith("free_")}
    runs = {}
    for name in ("controlnet", "gaussian", "lite", "concat", "no-dropout", "data-small", "data-medium"):
        info = json.loads((work / "runs" / name / "run.json").read_text())
        runs[name] = {
            k: info.get(k)
            for k in (
                "converged_at",
                "steps",
                "samples_seen",
                "seconds_this_session",
                "samples_per_s_this_session",
            )
        }
    sizes = {"data-small": DATA_SIZES[0], "data-medium": DATA_SIZES[1], "controlnet": N_TRAIN}
    (out / "claims.json").write_text(
        json.dumps({"eval": results, "runs": runs, "data_sizes": sizes}, indent=1) + "\n"
    )


def stage_identity(work: Path) -> None:
    """Claim 1: with its zero convolutions at zero, the controlled model's samples ARE the base's."""
    import numpy as np
    import torch

    from controlnet.controlnet import ControlNet, ControlNetConfig
    from controlnet.data import open_dataset
    from controlnet.evaluate import EvalConfig, evaluate
    from controlnet.formats import load_base
    from controlnet.recipes import architecture

    base = load_base(work / "base/final/base.safetensors")
    test = open_dataset(work / "fill50k-test")
    cn = ControlNet.from_unet(
        base.unet, ControlNetConfig.from_dict(architecture("fill50k-tiny")["controlnet"])
    )
    cfg = EvalConfig(n=16, steps=20, batch=16)
    torch.manual_seed(0)
    with_cn = evaluate(base, cn, test, cfg, progress=False)
    alone = evaluate(base, None, test, cfg, progress=False)
    same = all(np.array_equal(a[1], b[1]) for a, b in zip(with_cn.examples, alone.examples))
    out = work / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "identity.json").write_text(json.dumps({"samples": 16, "bitwise_identical": same}) + "\n")
    print(f"zero-init identity over 16 samples: bitwise identical = {same}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["base", "claims", "evaluate", "identity"])
    p.add_argument("--work", default="work/fill50k")
    p.add_argument("--smoke", action="store_true", help="tiny numbers, to check the script on a CPU")
    args = p.parse_args()
    if args.smoke:
        smoke()
    work = Path(args.work).resolve()
    {"base": stage_base, "claims": stage_claims, "evaluate": evaluate_claims, "identity": stage_identity}[
        args.stage
    ](work)


if __name__ == "__main__":
    main()
