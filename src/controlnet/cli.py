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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo]


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
