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


# ---------------------------------------------------------------------------- checkpoint files
_DTYPES = ("fp32", "fp16", "bf16")
_FORMATS = ("original", "diffusers", "controlnet")


def _dtype(name: str | None):
    import torch

    return (
        None if name is None else {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    )


def _print_written(paths: Sequence[object], fmt: str) -> None:
    for path in paths:
        print(f"wrote {path} ({fmt})")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import inspect_checkpoint

    print("\n".join(inspect_checkpoint(args.file).lines()))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="tell what a checkpoint file or folder holds")
    p.add_argument("file", help="weight file (.safetensors, .ckpt, .pth) or diffusers folder")
    p.set_defaults(handler=_cmd_inspect)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .formats import convert

    paths = convert(
        args.src, args.dst, args.to, part=args.part, dtype=_dtype(args.dtype), overwrite=args.force
    )
    _print_written(paths, args.to)
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a ControlNet or base model in another format")
    p.add_argument("src", metavar="IN")
    p.add_argument("dst", metavar="OUT", help="*.safetensors, or a folder for --to diffusers")
    p.add_argument("--to", choices=_FORMATS, required=True, help="output format ('controlnet' is ours)")
    p.add_argument(
        "--part", choices=("controlnet", "base"), help="of a file holding both (default: controlnet)"
    )
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating-point tensors (default: keep)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_convert)


def _cmd_init(args: argparse.Namespace) -> int:
    from .controlnet import ControlNetConfig
    from .formats import init_controlnet, load_base, save_controlnet

    base = load_base(args.base, dtype=_dtype(args.dtype)) if args.with_base else args.base
    config = ControlNetConfig(hint_channels=args.hint_channels, global_pool=args.global_pool)
    cn = init_controlnet(base, config=config, seed=args.seed, dtype=_dtype(args.dtype))
    embed = base if args.with_base else None
    _print_written(save_controlnet(cn, args.out, args.to, base=embed, overwrite=args.force), args.to)
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init", help="a new ControlNet copied from a base model (fresh hint encoder, zero convs)"
    )
    p.add_argument("--base", required=True, help="base model file or folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--to", choices=_FORMATS, default="controlnet", help="output format (default: %(default)s)"
    )
    p.add_argument("--hint-channels", type=int, default=3, help="channels of the condition image")
    p.add_argument("--global-pool", action="store_true", help="average each residual over H, W (shuffle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hint encoder's initialisation")
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating-point tensors (default: keep)")
    p.add_argument("--with-base", action="store_true", help="--to original: embed the base, as v1.0 files do")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_init)


def _cmd_transfer(args: argparse.Namespace) -> int:
    from .formats import load_base, save_controlnet, transfer_controlnet

    to_base = load_base(args.to_base) if args.with_base else args.to_base
    cn = transfer_controlnet(args.control, args.from_base, to_base)
    if args.dtype:
        cn = cn.to(_dtype(args.dtype))
    embed = to_base if args.with_base else None
    _print_written(save_controlnet(cn, args.out, args.to, base=embed, overwrite=args.force), args.to)
    return 0


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer", help="move a ControlNet to another base model of the same architecture: control + (B - A)"
    )
    p.add_argument("--control", required=True, help="the ControlNet, trained on base A")
    p.add_argument("--from-base", required=True, help="base A")
    p.add_argument("--to-base", required=True, help="base B (e.g. a community fine-tune of A)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--to", choices=_FORMATS, default="controlnet", help="output format (default: %(default)s)"
    )
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating-point tensors (default: the ControlNet's)")
    p.add_argument("--with-base", action="store_true", help="--to original: embed base B, as v1.0 files do")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_transfer)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_preprocess,
    _add_render,
    _add_data,
    _add_inspect,
    _add_convert,
    _add_init,
    _add_transfer,
]


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
