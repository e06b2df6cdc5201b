"""``controlnet demo``: the bundled model end to end, with a controllability score."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        args.out,
        family=args.family,
        image=args.image,
        prompt=args.prompt,
        samples=args.samples,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        base=args.base,
        controlnet=args.controlnet,
        progress=not args.quiet,
    )
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    from ..bundled import BUNDLED_MODELS

    p = sub.add_parser(
        "demo",
        help="a bundled model on CPU: an outline -> filled shapes, with a controllability score",
        description="Generate from an outline (built in, or --image: white lines on black) with a "
        "bundled model, write the grid (condition | samples) and sidecar, print the scores.",
    )
    p.add_argument(
        "--family",
        choices=tuple(BUNDLED_MODELS),
        default="unet",
        help="which bundled stack: the UNet one (one circle; built-in outline a circle) or the "
        "Flux-style transformer one (any outline; built-in outline three shapes) (default: %(default)s)",
    )
    p.add_argument("--image", help="your outline instead of the built-in one")
    p.add_argument(
        "--prompt", help="default: the built-in outline's (the UNet's: a red circle on light sky blue)"
    )
    p.add_argument("--samples", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default: the model's own: 1.5 for the bundled UNet)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", help="another base model (default: the bundled one)")
    p.add_argument("--controlnet", help="another ControlNet (default: the bundled one)")
    p.add_argument(
        "--out", default="outputs/demo", help="folder for the demo's images (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_demo)
