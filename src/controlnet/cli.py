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


def _cmd_data_fill50k(args: argparse.Namespace) -> int:
    from .data.fill50k import generate

    out = generate(
        args.out,
        args.n,
        size=args.size,
        seed=args.seed,
        kind=args.kind,
        min_delta_e=args.min_delta_e,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(out)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.datasets import open_dataset

    ds = open_dataset(args.path, resolution=args.resolution, annotator=args.annotator, skip_bad=args.skip_bad)
    print(f"{ds.root}: {ds.layout.value}, {len(ds)} items, {len(ds.skipped)} skipped")
    for s in ds.skipped:
        print(f"  skipped {s}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    from .data.fill50k import DEFAULT_MIN_DELTA_E, Kind

    p = sub.add_parser("data", help="make and check training data")
    data = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    f = data.add_parser(
        "fill50k", help="generate a fill50k-style set: outlines -> filled shapes in named colours"
    )
    f.add_argument("--out", required=True, help="folder to create (source/, target/, prompt.json)")
    f.add_argument("--n", type=int, default=50_000, help="number of pairs (default: %(default)s)")
    f.add_argument("--size", type=int, default=512, help="image side in pixels (default: %(default)s)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--kind", choices=[k.value for k in Kind], default=Kind.CIRCLE.value)
    f.add_argument(
        "--min-delta-e",
        type=float,
        default=DEFAULT_MIN_DELTA_E,
        help="least CIEDE2000 difference between fill and background colours (default: %(default)s)",
    )
    f.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    f.add_argument("--overwrite", action="store_true", help="replace the folder if it exists")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(handler=_cmd_data_fill50k)
    c = data.add_parser("check", help="open a data set folder, check every entry, report what is wrong")
    c.add_argument("path", help="folder (prompt.json, metadata.jsonl/.csv, or images) or its index file")
    c.add_argument("--resolution", type=int, default=None)
    c.add_argument("--annotator", default=None, help="annotator name, to compute conditions from targets")
    c.add_argument(
        "--skip-bad", action="store_true", help="list bad entries instead of stopping at the first"
    )
    c.set_defaults(handler=_cmd_data_check)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_data]


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
