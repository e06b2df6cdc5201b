"""``controlnet train`` and ``controlnet eval``: training runs and controllability scores."""

from __future__ import annotations

import argparse
from typing import Any

from ..choices import OBJECTIVES, DType, EvalMetric
from . import common


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's settings the flags describe: (RunSpec fields, TrainConfig fields)."""
    params = common.kv_params(args.annotator_param)
    if args.annotator and params:
        from ..annotators import get

        params = get(args.annotator).parse_params([f"{k}={v}" for k, v in params.items()])
    spec = {
        "data": args.data,
        "objective": args.objective,
        "base": args.base,
        "arch": args.arch,
        "init_controlnet": args.init_controlnet,
        "hint_channels": args.hint_channels,
        "global_pool": args.global_pool,
        "control_mode": args.control_mode,
        "controlnet_config": common.json_object(
            args.controlnet_config or "{}", "--controlnet-config", '{"num_layers": 2, "num_single_layers": 4}'
        ),
        "sd_locked": args.sd_locked,
        "only_mid_control": args.only_mid_control,
        "empty_prompt_prob": args.empty_prompt_prob,
        "noise_offset": args.noise_offset,
        "resolution": args.resolution,
        "annotator": args.annotator,
        "annotator_params": params,
        "skip_bad": args.skip_bad,
        "cache": args.cache,
        "validation_steps": args.validation_steps,
        "validation_guidance": args.validation_guidance,
        "export": args.export.split(",") if args.export else [],
    }
    cfg = {
        name: getattr(args, name)
        for name in (
            "steps",
            "epochs",
            "batch_size",
            "grad_accum",
            "lr",
            "decoder_lr",
            "warmup_steps",
            "lr_schedule",
            "max_grad_norm",
            "mixed_precision",
            "gradient_checkpointing",
            "compile",
            "compile_mode",
            "ema_decay",
            "seed",
            "checkpoint_every",
            "keep_checkpoints",
            "validate_every",
            "validation_count",
            "score_name",
            "score_threshold",
            "log_every",
            "num_workers",
            "cpu",
        )
    }
    cfg["progress"] = not args.quiet
    return spec, cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from ..errors import SettingError
    from ..training.recipes import RunSpec, run_training
    from ..training.train import TrainConfig

    spec, cfg = _settings(args)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one")
    if args.resume:  # the run's recorded settings, under the flags given (those that differ
        from ..training.resume import resumed_settings  # from their defaults)

        d_spec, d_cfg = _settings(args.train_parser.parse_args(["--out", args.out]))
        given_spec = {k: v for k, v in spec.items() if v != d_spec[k]}
        given_cfg = {k: v for k, v in cfg.items() if v != d_cfg[k]}
        run_spec, config = resumed_settings(args.out, given_spec, given_cfg)
    else:
        if args.data is None:
            raise ValueError("--data is required (unless --resume continues a run, which records it)")
        run_spec = RunSpec(**spec)
        config = TrainConfig(out=args.out, overwrite=args.overwrite, **cfg)
    try:
        r = run_training(run_spec, config)
    except SettingError as e:  # a setting's Python name, said as this command's flag
        raise ValueError(e.spoken(_flags(args.train_parser))) from None
    if not r.main:  # (one of several processes: process 0 reports the run)
        return 0
    print(
        f"trained {r.state.step} steps ({r.state.samples_seen:,} samples) in {r.seconds:.0f} s, "
        f"{r.samples_per_second:.1f} samples/s; run folder {r.run_dir}"
    )
    if r.converged_at is not None:
        crossed = f"{config.score_name} crossed {config.score_threshold}"
        print(f"sudden convergence: {crossed} at step {r.converged_at}")
    for p in r.exported:
        print(f"exported {p}")
    return 0


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination (a setting's name) -> its long flag."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a ControlNet (or a base model stage) on your data, on one GPU or many",
        description="Train with one loop for every objective. Several GPUs: run it under `accelerate launch` "
        "or `torchrun` (data parallel), or with an accelerate FSDP config (fsdp_version: 2) that shards "
        "a ControlNet run's weights across them. Resumable: --resume continues the run "
        "folder's newest checkpoint exactly.",
    )
    p.add_argument(
        "--data",
        help="prompt.json folder, metadata.jsonl/.csv folder, or image folder (with --resume: the run's)",
    )
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, samples, final export")
    p.add_argument(
        "--objective",
        default="controlnet",
        choices=list(OBJECTIVES),
        help="what is trained: controlnet (the paper), adapter (a T2I-Adapter, same loss and data), "
        "the ablations gaussian / lite / concat, or a base model's stages vae / base",
    )
    p.add_argument("--base", help="base model file or folder")
    p.add_argument("--arch", help="with --objective vae: a fresh base of this architecture (preset or JSON)")
    p.add_argument("--init-controlnet", help="start from this ControlNet (e.g. `controlnet init` output)")
    p.add_argument("--hint-channels", type=int, help="channels of the condition image (default 3)")
    p.add_argument("--global-pool", action="store_true", help="average residuals over space (shuffle-style)")
    p.add_argument(
        "--control-mode",
        type=int,
        help="a Union ControlNet's mode (0-based) for the data set's kind of condition",
    )
    p.add_argument(
        "--controlnet-config",
        metavar="JSON",
        help="fields of a fresh ControlNet's configuration, e.g. how many blocks of a transformer it "
        'copies and a Union\'s modes: \'{"num_layers": 2, "num_single_layers": 4, "num_mode": 3}\' (Flux), '
        "'{\"num_layers\": 6}' (SD3)",
    )
    p.add_argument(
        "--sd-locked",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the UNet decoder locked (default); --no-sd-locked trains it at --decoder-lr",
    )
    p.add_argument("--only-mid-control", action="store_true", help="inject only the middle residual")
    p.add_argument(
        "--empty-prompt-prob", type=float, help="prompt dropout (default 0.5, the paper's; 0.1 for base)"
    )
    p.add_argument(
        "--noise-offset",
        type=float,
        default=0.0,
        help="offset noise: std of a per-channel constant added to the training noise (e.g. 0.1), "
        "so the model takes colours from the prompt, not from the starting noise",
    )
    p.add_argument("--resolution", type=int, help="resize and centre-crop images to this square size")
    p.add_argument("--annotator", help="compute conditions from the images with this annotator")
    p.add_argument("--annotator-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad entries instead of stopping")
    p.add_argument("--cache", help="folder for cached VAE latents and prompt embeddings (built if missing)")
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, default=4, help="per process (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--decoder-lr", type=float, default=2e-6)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="after the warm-up: constant, or a cosine decay to zero at the last step",
    )
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument(
        "--mixed-precision",
        type=common.dtype_arg,
        default=DType.FLOAT32,
        metavar="{" + ",".join(common.DTYPES) + "}",
        help="the frozen parts' dtype and autocast's; the trained weights stay float32 (default: float32)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument(
        "--compile-mode",
        default="default",
        help="with --compile: 'default' fuses kernels; 'reduce-overhead' also replays each step "
        "from CUDA graphs (fastest; each new batch shape, as validation's, compiles again)",
    )
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.999); exported if set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--validation-count", type=int, default=8, help="held-out items (0: no validation)")
    p.add_argument("--validation-steps", type=int, default=20)
    p.add_argument(
        "--validation-guidance", type=float, help="default: the base model's own (SD's 9 if it has none)"
    )
    p.add_argument("--score-name", help="validation score whose first crossing is logged (e.g. iou)")
    p.add_argument("--score-threshold", type=float, help="threshold of --score-name (e.g. 0.8)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--export",
        default="controlnet",
        help="formats of the final ControlNet or T2I-Adapter, comma-separated: controlnet,diffusers,original",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's newest checkpoint, with the settings its run.json "
        "records (flags given may change only --steps/--epochs and how the run reports)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run folder that holds an earlier run, removing its files "
        "(without it such a folder is refused)",
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_train, train_parser=p)


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import open_dataset
    from ..evaluation.evaluate import EvalConfig, evaluate, write_report
    from ..generation.defaults import model_settings
    from ..generation.pipeline import ModelCache, resolve_paths
    from ..generation.request import ControlRequest, GenerationRequest

    if args.reconstruct and args.controlnet:
        raise ValueError("--reconstruct scores the base's VAE alone: drop --controlnet")
    req = resolve_paths(
        GenerationRequest(
            base=args.base,
            controls=[]
            if args.no_controlnet or args.reconstruct
            else [ControlRequest(image="", controlnet=args.controlnet)],
        )
    )
    device = common.device(args)
    cache = ModelCache()
    base = cache.base(req.base, torch.float32, device)  # type: ignore[arg-type]
    cn = None
    if req.controls:  # (a Control-LoRA is built on the base just loaded)
        cn = cache.controlnet(req.controls[0].controlnet, torch.float32, device, (req.base, ()))  # type: ignore[arg-type]
    settings = model_settings(args.base)
    guidance = settings.get("guidance", EvalConfig.guidance)
    cfg = EvalConfig(
        n=args.n,
        steps=args.steps,
        guidance=guidance if args.guidance is None else args.guidance,
        sampler=settings.get("sampler", EvalConfig.sampler) if args.sampler is None else args.sampler,
        seed=args.seed,
        batch=args.batch,
        prompt_setting=args.prompt_setting,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        metric=args.metric,
        annotator=args.annotator,
        annotator_params=common.kv_params(args.annotator_param),
        reconstruct=args.reconstruct,
    )
    dataset = open_dataset(args.data, resolution=args.resolution)
    result = evaluate(base, cn, dataset, cfg, progress=not args.quiet)
    md = write_report(
        result,
        args.out,
        title=f"VAE round trips of {req.base}"
        if args.reconstruct
        else f"evaluation of {req.controls[0].controlnet if cn else req.base}",
    )
    for k, v in result.summary.items():
        print(f"{k}: {v:.4f}")
    print(f"wrote {md}, results.json and examples.png")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure how well outputs follow their conditions",
        description="Generate one image per item of a data set and score it: fill50k or outlines IoU and "
        "colour accuracy, edge F1, SSIM, depth RMSE or segmentation mIoU.",
    )
    p.add_argument("--data", required=True, help="a data set folder (its conditions and prompts are used)")
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="default: the bundled model")
    p.add_argument("--controlnet", help="default: the bundled ControlNet")
    p.add_argument("--no-controlnet", action="store_true", help="the base model alone (prompt colours only)")
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="score the base's VAE round trip of each target instead of generating: the most any "
        "model on this VAE can score",
    )
    p.add_argument("--metric", default=EvalMetric.FILL50K.value, choices=[m.value for m in EvalMetric])
    p.add_argument("--annotator", help="for ssim/depth/segmentation: the annotator that made the maps")
    p.add_argument("--annotator-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--guidance", type=float, help=common.model_default_help("guidance", "classifier-free guidance scale")
    )
    p.add_argument("--sampler", help="default: the base model's own (euler for Flux.1 and SD3), else ddim")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--prompt-setting", default="user", choices=["user", "none", "default"])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--resolution", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_eval)


def add(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_eval(sub)
