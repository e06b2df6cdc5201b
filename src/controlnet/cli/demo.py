"""``controlnet demo``: the bundled model end to end, with a controllability score."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        args.out,
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
    from ..bundled import BUNDLED_GUIDANCE
    from ..demo import DEMO_PROMPT

    p = sub.add_parser(
        "demo",
        help="the bundled model on CPU: an outline -> filled shapes, with a controllability score",
        description="Generate from an outline (built in, or --image: white lines on black) with the "
        "bundled model, write the grid (condition | samples) and sidecar, print the scores.",
    )
    p.add_argument("--image", help="your outline instead of the built-in circle")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="default: %(default)r")
    p.add_argument("--samples", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    p.add_argument(
        "--guidance",
        type=float,
        default=BUNDLED_GUIDANCE,
        help="classifier-free guidance scale (default: %(default)s, the bundled model's best)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", help="another base model (default: the bundled one)")
    p.add_argument("--controlnet", help="another ControlNet (default: the bundled one)")
    p.add_argument(
        "--out", default="outputs/demo", help="folder for the demo's images (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_demo)
