"""The ``controlnet`` command: a thin shell over the library. No model logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__

Handler = Callable[[argparse.Namespace], int]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="show the model working end to end on CPU")
    p.add_argument(
        "--out", default="outputs/demo", help="folder for the demo's images (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=60, help="training steps of the demo (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_demo)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from . import annotators as A
    from .imageio import check_output_path, read_image, read_mask, write_image

    if args.list:
        print(A.describe())
        return 0
    if not args.name or not args.input or not args.output:
        raise ValueError(
            "usage: controlnet preprocess NAME INPUT -o OUTPUT [--param KEY=VALUE ...], or --list"
        )
    annotator = A.get(args.name)
    params = annotator.parse_params(args.param)
    if args.mask and "mask" not in annotator.inputs:
        raise ValueError(f"annotator {annotator.name} takes no mask")
    check_output_path(args.output)
    image = read_image(args.input)
    extra = {"mask": read_mask(args.mask)} if args.mask else {}
    cond = A.prepare_condition(
        annotator.name,
        image,
        resolution=args.resolution,
        detect_resolution=args.detect_resolution,
        **params,
        **extra,
    )
    write_image(args.output, cond)
    print(f"{args.output}: {annotator.name} map, {cond.shape[1]}x{cond.shape[0]}")
    return 0


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="make a condition map (edges, pose, depth, ...) from an image",
        description="Run an annotator on an image and write the condition map. "
        "`controlnet preprocess --list` shows every annotator with its parameters.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="annotator name (see --list)")
    p.add_argument("input", nargs="?", metavar="INPUT", help="input image")
    p.add_argument("-o", "--output", metavar="OUTPUT", help="output image (.png keeps inpaint masks)")
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="annotator parameter (repeatable)"
    )
    p.add_argument(
        "--resolution", type=int, help="resize the map for the model (short side, multiples of 64)"
    )
    p.add_argument("--detect-resolution", type=int, help="resize the image before the annotator runs")
    p.add_argument("--mask", metavar="MASK", help="mask image for inpaint (white = repaint)")
    p.add_argument("--list", action="store_true", help="list the annotators, their parameters and weights")
    p.set_defaults(handler=_cmd_preprocess)


def _cmd_render(args: argparse.Namespace) -> int:
    from .annotators.render import render_file
    from .imageio import check_output_path, write_image

    check_output_path(args.output)
    cond = render_file(
        args.kind,
        args.input,
        width=args.width,
        height=args.height,
        palette=args.palette,
        depth_kind=args.depth_kind,
        order=args.order,
    )
    write_image(args.output, cond)
    print(f"{args.output}: {args.kind} map, {cond.shape[1]}x{cond.shape[0]}")
    return 0


def _add_render(sub: argparse._SubParsersAction) -> None:
    from .annotators.palettes import PALETTES
    from .annotators.render import RENDER_KINDS

    p = sub.add_parser(
        "render",
        help="draw structured data as a condition map: OpenPose JSON, depth/normal/label arrays",
        description="pose: OpenPose JSON; depth: HxW .npy; normals: HxWx3 .npy unit vectors; "
        "labels: HxW .npy or a label image (grey value = class index).",
    )
    p.add_argument("kind", choices=RENDER_KINDS)
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", metavar="OUTPUT", required=True)
    p.add_argument("--width", type=int, help="pose canvas width (when the JSON has no canvas_width)")
    p.add_argument("--height", type=int, help="pose canvas height (when the JSON has no canvas_height)")
    p.add_argument("--palette", choices=tuple(PALETTES), default="ade20k", help="labels palette")
    p.add_argument(
        "--depth-kind", choices=("inverse", "metric"), default="inverse", help="inverse: near = large values"
    )
    p.add_argument("--order", choices=("xyz", "zyx"), default="xyz", help="normal map channel order")
    p.set_defaults(handler=_cmd_render)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_preprocess, _add_render]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnet",
        description="ControlNet for Stable Diffusion-family models: generate, prepare conditions, "
        "train, convert and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"controlnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"controlnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
