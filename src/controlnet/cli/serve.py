"""``controlnet serve``: the web app and the HTTP API."""

from __future__ import annotations

import argparse

from ..choices import DType
from . import common


def _help(name: str) -> str:
    """The help of a generation parameter the server sets for every request."""
    from ..generation.request import GenerationRequest
    from ..schema import params

    return params(GenerationRequest)[name][1].help


_APP_MISSING = "the web app needs Gradio: pip install 'controlnet[app]'"


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError(_APP_MISSING) from None

    from ..serving.limits import Limits
    from ..serving.server import serve
    from ..serving.service import ServeConfig

    limits = Limits(
        max_megapixels=args.max_megapixels,
        max_upload_megapixels=args.max_upload_megapixels,
        max_upload_mb=args.max_upload_mb,
        max_steps=args.max_steps,
        max_samples=args.max_samples,
        max_queue=args.max_queue,
    )
    config = ServeConfig(
        base=args.base,
        controlnets=tuple(args.controlnet),
        family=args.family,
        device=common.device(args),
        dtype=args.dtype,
        offload=args.offload,
        fp8=args.fp8,
        captioner=args.captioner,
        vae=args.vae,
        loras=tuple(args.lora or ()),
        out_dir=args.out,
        limits=limits,
        annotator_weights=tuple(args.annotator_weights),
    )
    serve(config, host=args.host, port=args.port)  # until Ctrl-C
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    from ..bundled import BUNDLED_MODELS
    from ..serving.limits import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="the web app and HTTP API (needs the 'app' extra)",
        description="Serve the web app at / and the HTTP JSON API under /api (see docs/app.md). "
        "With no --base/--controlnet the bundled model is used. Generations run one at a time; "
        "others wait in a queue. Needs Gradio: pip install 'controlnet[app]'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--base", help="base model file or folder (default: the bundled model)")
    p.add_argument(
        "--family",
        choices=tuple(BUNDLED_MODELS),
        default="unet",
        help="which bundled stack serves where --base or --controlnet is not given: the UNet one or "
        "the Flux-style transformer one (default: %(default)s)",
    )
    p.add_argument("--vae", help=_help("vae"))
    p.add_argument(
        "--lora",
        action="append",
        type=common.lora_arg,
        metavar="FILE[:SCALE]",
        help=_help("loras") + " (FILE or FILE:SCALE; repeatable)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        help="ControlNet file or folder, repeatable; offered by name (default: the bundled one)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    common.add_dtype(p, "the networks' floating-point type", default=DType.FLOAT32)
    p.add_argument("--offload", action="store_true", help=_help("offload"))
    p.add_argument("--fp8", action="store_true", help=_help("fp8"))
    p.add_argument("--captioner", help="local BLIP captioner folder, for the 'auto' prompt setting")
    p.add_argument(
        "--annotator-weights",
        action="append",
        default=[],
        metavar="PATH",
        help="a weights file or folder the learned annotators may use, repeatable; clients choose "
        "it by its name, as they do the files in the annotator folder (they never name a path)",
    )
    p.add_argument("--out", help="keep results and their inputs here (default: a temporary folder)")
    g = p.add_argument_group("limits per request")
    g.add_argument(
        "--max-megapixels",
        type=float,
        default=d.max_megapixels,
        help="output image size (default: %(default)s)",
    )
    g.add_argument(
        "--max-upload-megapixels",
        type=float,
        default=d.max_upload_megapixels,
        help="uploaded image size (default: %(default)s)",
    )
    g.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help="uploaded file size (default: %(default)s)",
    )
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="(default: %(default)s)")
    g.add_argument("--max-samples", type=int, default=d.max_samples, help="(default: %(default)s)")
    g.add_argument(
        "--max-queue", type=int, default=d.max_queue, help="generations waiting (default: %(default)s)"
    )
    p.set_defaults(handler=_cmd_serve)
