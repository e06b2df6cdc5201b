"""``controlnet preprocess`` and ``controlnet render``: condition maps from images and from data."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .. import annotators as A
    from ..imageio import check_output_path, list_images, read_image, read_mask, write_image

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
    if Path(args.input).is_dir():  # a folder: a map per image, named after it, in the folder -o
        images = list_images(args.input)
        masks = (
            list_images(args.mask) if args.mask and Path(args.mask).is_dir() else [args.mask] * len(images)
        )
        if len(masks) != len(images):
            raise ValueError(
                f"the mask folder {args.mask} holds {len(masks)} images and {args.input} holds "
                f"{len(images)}; they are paired by position"
            )
        out = Path(args.output)
        if out.suffix:
            raise ValueError(f"INPUT {args.input} is a folder: -o names a folder for the maps, not {out}")
        jobs = [(image, mask, out / f"{image.stem}.png") for image, mask in zip(images, masks)]
    else:
        jobs = [(Path(args.input), args.mask, check_output_path(args.output))]
    from tqdm.auto import tqdm

    for image, mask, target in tqdm(jobs, desc=annotator.name, unit="image", disable=len(jobs) == 1):
        extra = {"mask": read_mask(mask)} if mask else {}
        cond = A.prepare_condition(
            annotator.name,
            read_image(image),
            resolution=args.resolution,
            detect_resolution=args.detect_resolution,
            **params,
            **extra,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(target, cond)
        tqdm.write(f"{target}: {annotator.name} map, {cond.shape[1]}x{cond.shape[0]}")
    return 0


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="make a condition map (edges, pose, depth, ...) from an image",
        description="Run an annotator on an image and write the condition map. "
        "`controlnet preprocess --list` shows every annotator with its parameters.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="annotator name (see --list)")
    p.add_argument("input", nargs="?", metavar="INPUT", help="input image, or a folder of them")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT",
        help="output image (.png keeps inpaint masks); for a folder INPUT, a folder",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="annotator parameter (repeatable)"
    )
    p.add_argument(
        "--resolution", type=int, help="resize the map for the model (short side, multiples of 64)"
    )
    p.add_argument("--detect-resolution", type=int, help="resize the image before the annotator runs")
    p.add_argument(
        "--mask",
        metavar="MASK",
        help="mask image for inpaint (white = repaint); a folder pairs with a folder INPUT",
    )
    p.add_argument("--list", action="store_true", help="list the annotators, their parameters and weights")
    p.set_defaults(handler=_cmd_preprocess)


def _cmd_render(args: argparse.Namespace) -> int:
    from ..annotators.render import render_file
    from ..imageio import check_output_path, write_image

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
    from ..annotators.palettes import PALETTES
    from ..annotators.render import RENDER_KINDS

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


def add(sub: argparse._SubParsersAction) -> None:
    _add_preprocess(sub)
    _add_render(sub)
