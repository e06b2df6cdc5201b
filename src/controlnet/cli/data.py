"""``controlnet data``: make, check and cache training data."""

from __future__ import annotations

import argparse

from . import common


def _cmd_data_fill50k(args: argparse.Namespace) -> int:
    from ..data.fill50k import generate

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


def _cmd_data_outlines(args: argparse.Namespace) -> int:
    from ..data.outlines import generate_outlines

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    out = generate_outlines(
        args.out,
        args.n,
        size=args.size,
        seed=args.seed,
        kinds=kinds,
        max_shapes=args.max_shapes,
        max_line_width=args.max_line_width,
        min_delta_e=args.min_delta_e,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(out)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from ..data.datasets import open_dataset

    ds = open_dataset(args.path, resolution=args.resolution, annotator=args.annotator, skip_bad=args.skip_bad)
    print(f"{ds.root}: {ds.layout.value}, {len(ds)} items, {len(ds.skipped)} skipped")
    for s in ds.skipped:
        print(f"  skipped {s}")
    return 0


def _add_set_options(p: argparse.ArgumentParser, size: int, min_delta_e_help: str) -> None:
    """The options every generated pair set takes: where, how many, how large, the seed, colour
    distinctness, processes, overwriting and progress."""
    from ..data.fill50k import DEFAULT_MIN_DELTA_E

    p.add_argument("--out", required=True, help="folder to create (source/, target/, prompt.json)")
    p.add_argument("--n", type=int, default=50_000, help="number of pairs (default: %(default)s)")
    p.add_argument("--size", type=int, default=size, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-delta-e",
        type=float,
        default=DEFAULT_MIN_DELTA_E,
        help=f"{min_delta_e_help} (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    p.add_argument("--overwrite", action="store_true", help="replace the folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add(sub: argparse._SubParsersAction) -> None:
    from ..data.fill50k import Kind
    from ..data.outlines import FigureKind

    p = sub.add_parser("data", help="make and check training data")
    data = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    f = data.add_parser(
        "fill50k", help="generate a fill50k-style set: outlines -> filled shapes in named colours"
    )
    _add_set_options(f, 512, "least CIEDE2000 difference between fill and background colours")
    f.add_argument("--kind", choices=[k.value for k in Kind], default=Kind.CIRCLE.value)
    f.set_defaults(handler=_cmd_data_fill50k)
    o = data.add_parser(
        "outlines",
        help="generate an outlines set: several closed shapes of any kind -> each filled in its own colour",
    )
    _add_set_options(o, 128, "least CIEDE2000 difference between any two colours of an image")
    o.add_argument(
        "--kinds",
        help="comma-separated shape kinds to draw (default: all of "
        f"{', '.join(k.value for k in FigureKind)}); leave one out to test on it later",
    )
    o.add_argument(
        "--max-shapes", type=int, default=4, help="shapes per image, 1 to this (default: %(default)s)"
    )
    o.add_argument(
        "--max-line-width", type=int, help="outlines are 1 to this many pixels wide (default: 2, 4 at 512 px)"
    )
    o.set_defaults(handler=_cmd_data_outlines)
    c = data.add_parser("check", help="open a data set folder, check every entry, report what is wrong")
    c.add_argument("path", help="folder (prompt.json, metadata.jsonl/.csv, or images) or its index file")
    c.add_argument("--resolution", type=int, default=None)
    c.add_argument("--annotator", default=None, help="annotator name, to compute conditions from targets")
    c.add_argument(
        "--skip-bad", action="store_true", help="list bad entries instead of stopping at the first"
    )
    c.set_defaults(handler=_cmd_data_check)
    k = data.add_parser(
        "cache", help="precompute VAE latents and prompt embeddings of a data set for a base model"
    )
    k.add_argument("path", help="data set folder")
    k.add_argument("--base", required=True, help="base model file or folder")
    k.add_argument(
        "--out", required=True, help="cache folder (reused when it matches; refused when it does not)"
    )
    k.add_argument("--resolution", type=int, default=None)
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--device", help="default: cuda when available")
    k.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    k.add_argument(
        "--overwrite", action="store_true", help="rebuild a cache made from another data set or model"
    )
    k.add_argument("--quiet", action="store_true")
    k.set_defaults(handler=_cmd_data_cache)


def _cmd_data_cache(args: argparse.Namespace) -> int:
    import torch

    from ..data import build_cache, open_dataset
    from ..formats import load_base

    device = common.device(args)
    base = load_base(args.base, dtype=torch.float32).to(device)
    dataset = open_dataset(args.path, resolution=args.resolution)
    out = build_cache(
        dataset,
        base,
        args.out,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"cache of {len(dataset)} items in {out}")
    return 0
