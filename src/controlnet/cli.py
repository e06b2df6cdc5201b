"""The ``controlnet`` command: a thin shell over the library. No model logic lives here."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__

Handler = Callable[[argparse.Namespace], int]


def _device(args: argparse.Namespace) -> str:
    """--device, else cuda when available."""
    from .annotators.weights import default_device

    return args.device or str(default_device())


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .bundled import BUNDLED_GUIDANCE
    from .demo import DEMO_PROMPT

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


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from . import annotators as A
    from .imageio import check_output_path, list_images, read_image, read_mask, write_image

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

    from .data import build_cache, open_dataset
    from .formats import load_base

    device = _device(args)
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
        args.src,
        args.dst,
        args.to,
        part=args.part,
        dtype=_dtype(args.dtype),
        overwrite=args.force,
        base=args.base,
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
    p.add_argument(
        "--base", help="IN a Control-LoRA: the base model it is built on (written out as a whole ControlNet)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_convert)


def _cmd_init(args: argparse.Namespace) -> int:
    from .families.sd.controlnet import ControlNetConfig
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


# ---------------------------------------------------------------------------------------- generate
def _control_params(values: list[str], n: int) -> list[dict[str, str]]:
    """``--param [I:]KEY=VALUE``: annotator parameters for control I (0-based), or for every
    control without ``I:``. Values stay strings; the annotator parses and checks them."""
    params: list[dict[str, str]] = [{} for _ in range(n)]
    for v in values:
        target, _, kv = v.rpartition(":") if ":" in v.split("=", 1)[0] else ("", "", v)
        if "=" not in kv:
            raise ValueError(f"--param {v!r}: expected [I:]KEY=VALUE")
        key, value = kv.split("=", 1)
        if target:
            if not target.isdigit() or int(target) >= n:
                raise ValueError(f"--param {v!r}: control index {target} is not one of 0..{n - 1}")
            params[int(target)][key] = value
        else:
            for p in params:
                p[key] = value
    return params


def _per_control(values: list, n: int, flag: str, default: object) -> list:
    """A repeatable per-control flag: none -> the default for all, one -> for all, else one each."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{len(values)} values of {flag} for {n} control images: give 1 or {n}")
    return values


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation.generate import ControlRequest, GenerationRequest, LoraRequest
    from .generation.pipeline import run_batch

    if args.from_sidecar:
        return _replay(args)
    n = len(args.image)
    cols = {
        "controlnet": _per_control(args.controlnet, n, "--controlnet", None),
        "preprocess": _per_control(args.preprocess, n, "--preprocess", None),
        "strength": _per_control(args.strength, n, "--strength", 1.0),
        "start": _per_control(args.start, n, "--start", 0.0),
        "end": _per_control(args.end, n, "--end", 1.0),
        "mode": _per_control(args.mode, n, "--mode", "balanced"),
        "region_mask": _per_control(args.region_mask, n, "--region-mask", None),
    }
    params = _control_params(args.param, n)
    controls = [
        ControlRequest(
            image=img,
            params=params[i],
            guess_mode=args.guess_mode,
            **{
                k: (None if k in ("preprocess", "region_mask") and v == "none" else v)
                for k, v in zip(cols, vals)
            },
        )
        for i, (img, vals) in enumerate(zip(args.image, zip(*cols.values())))
    ]
    if n:  # annotator parameter values arrive as text: let each annotator parse its own
        from .annotators import get

        for c in controls:
            if c.preprocess is not None:
                c.params = get(c.preprocess).parse_params([f"{k}={v}" for k, v in c.params.items()])

    from .bundled import model_settings

    given = {
        "guidance": args.guidance,
        "added_prompt": args.added_prompt,
        "negative_prompt": args.negative_prompt,
    }
    request = GenerationRequest(
        **{**model_settings(args.base), **{k: v for k, v in given.items() if v is not None}},
        prompt=args.prompt,
        controls=controls,
        prompt_setting=args.prompt_setting,
        prompt_syntax=args.prompt_syntax,
        clip_skip=args.clip_skip,
        captioner=args.captioner,
        base=args.base,
        vae=args.vae,
        loras=[LoraRequest(path, scale) for path, scale in args.lora or ()],
        sampler=args.sampler,
        timestep_spacing=args.timestep_spacing,
        eta=args.eta,
        steps=args.steps,
        seed=args.seed,
        num_samples=args.num_samples,
        resolution=args.resolution,
        width=args.width,
        height=args.height,
        resize_mode=args.resize_mode,
        init_image=args.init_image,
        denoise=args.denoise,
        mask=args.mask,
        mask_blur=args.mask_blur,
        overlay=not args.no_overlay,
        hires_scale=args.hires_scale,
        hires_denoise=args.hires_denoise,
        hires_steps=args.hires_steps,
        hires_upscaler=args.hires_upscaler,
        dtype=args.dtype,
        device=_device(args),
        fast=args.fast,
        offload=args.offload,
        vae_tiling=args.vae_tiling,
    )
    done = run_batch(request, args.out, progress=not args.quiet)
    result, sidecar = done[0]
    n_img, seconds = sum(len(r.images) for r, _ in done), sum(r.seconds for r, _ in done)
    what = f"{len(done)} generations, " if len(done) > 1 else ""
    print(f"{what}{n_img} image(s) in {seconds:.1f} s, seed {result.seeds[0]}; prompt: {result.prompt!r}")
    if len(done) > 1:
        print(f"wrote {len(done)} sidecars (and their images and grids) to {sidecar.parent}")
    else:
        print(f"wrote {sidecar} (and its images and grid)")
    return 0


def _replay(args: argparse.Namespace) -> int:

    from .generation.pipeline import run
    from .generation.sidecar import read_sidecar, verify_inputs

    record = read_sidecar(args.from_sidecar)
    verify_inputs(record)
    out = args.out if args.out != _GENERATE_OUT else str(Path(args.from_sidecar).parent / "replay")
    result, sidecar = run(record.request, out, progress=not args.quiet)
    new = read_sidecar(sidecar).outputs["images"]
    old = record.outputs.get("images", [])
    same = len(new) == len(old) and all(a["sha256"] == b["sha256"] for a, b in zip(new, old))
    print(f"replayed {args.from_sidecar}: {len(result.images)} image(s) -> {sidecar}")
    print(
        "images are bit-identical to the recorded ones"
        if same
        else "WARNING: images differ from the recorded ones (other hardware, library versions or dtype?)"
    )
    return 0 if same else 1


_GENERATE_OUT = "outputs/generate"
_OFFLOAD_HELP = "keep the text encoders and the VAE in CPU memory, on the GPU only while they run"
_VAE_HELP = "a VAE file or folder to use in place of the base model's (original or diffusers layout)"
_LORA_HELP = (
    "a LoRA file (kohya/A1111 or diffusers/PEFT layout) merged into the base model, SCALE times "
    "(default 1); repeat for several"
)
_LORA_SPEC = re.compile(r"^(?P<path>.+):(?P<scale>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def lora_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale); a name that exists as written is a file, whole."""
    m = _LORA_SPEC.match(text)
    if m is None or Path(text).exists():
        return text, 1.0
    return m["path"], float(m["scale"])


#: the samplers' names (generation.sampling.Sampler's), spelled out: --help imports no diffusers
SAMPLERS = ("ddim", "unipc", "dpmpp-2m", "dpmpp-2m-karras", "dpmpp-2m-sde-karras", "euler", "euler-a", "lcm")
#: ``controlnet.generation.sampling.TimestepSpacing``'s names, likewise
SPACINGS = ("default", "leading", "linspace", "trailing")
_GUIDANCE_HELP = "classifier-free guidance scale (default 9; 1.5 for the bundled model, used without --base)"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="images from a prompt and one or more condition images",
        description="Generate images with one or more ControlNets. Per-control flags (--image, --controlnet, "
        "--preprocess, --strength, --start, --end, --mode) repeat in order, one per control; a single value "
        "applies to all. With no --base/--controlnet the bundled model is used.",
    )
    c = p.add_argument_group("controls (repeat per control, in order)")
    c.add_argument(
        "--image",
        action="append",
        default=[],
        help="condition map, or raw image with --preprocess; a folder: one generation per image",
    )
    c.add_argument(
        "--controlnet",
        action="append",
        default=[],
        help="ControlNet file or folder (a Control-LoRA is built on the base)",
    )
    c.add_argument(
        "--preprocess", action="append", default=[], help="annotator to run on the image ('none': ready map)"
    )
    c.add_argument(
        "--param", action="append", default=[], metavar="[I:]KEY=VALUE", help="annotator parameter"
    )
    c.add_argument("--strength", action="append", type=float, default=[], help="control strength (default 1)")
    c.add_argument(
        "--start", action="append", type=float, default=[], help="first fraction of steps (default 0)"
    )
    c.add_argument(
        "--end", action="append", type=float, default=[], help="last fraction of steps (default 1)"
    )
    c.add_argument("--mode", action="append", default=[], help="balanced | prompt | controlnet")
    c.add_argument(
        "--region-mask",
        action="append",
        default=[],
        metavar="IMAGE",
        help="where the control acts: white (or opaque) pixels ('none': everywhere, the default)",
    )
    c.add_argument(
        "--guess-mode", action="store_true", help="ControlNet is more important, for every control"
    )
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", default="")
    g.add_argument(
        "--prompt-setting",
        default="user",
        choices=["user", "none", "default", "auto"],
        help="the paper's settings: user prompt, none, the default prompt, or auto (a caption)",
    )
    g.add_argument("--captioner", help="local BLIP captioner folder, for --prompt-setting auto")
    g.add_argument(
        "--added-prompt",
        help="appended to the prompt (default: the released apps' quality words; none for the bundled model)",
    )
    g.add_argument(
        "--negative-prompt", help="default: the released apps' negative prompt (none for the bundled model)"
    )
    g.add_argument(
        "--prompt-syntax",
        default="weighted",
        choices=["weighted", "plain"],
        help="weighted (default): (emphasis), [less], (words:1.5), BREAK and prompts past 75 tokens, "
        "as in the A1111 web UI; plain: the text as it is, cut after 75 tokens",
    )
    g.add_argument(
        "--clip-skip",
        type=int,
        default=1,
        help="read the text encoder's Nth layer from the end, as the A1111 web UI's Clip skip "
        "(SD1.x models; default 1: the last)",
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--base", help="base model file or folder (default: the bundled model)")
    s.add_argument("--vae", help=_VAE_HELP)
    s.add_argument("--lora", action="append", type=lora_arg, metavar="FILE[:SCALE]", help=_LORA_HELP)
    s.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    s.add_argument(
        "--timestep-spacing",
        default="default",
        choices=SPACINGS,
        help="which timesteps the steps visit (default: the sampler's own; trailing: the A1111 web "
        "UI's SGM Uniform, for few-step models such as SDXL-Turbo and -Lightning)",
    )
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, help=_GUIDANCE_HELP)
    s.add_argument("--seed", type=int, help="default: a random seed (recorded in the sidecar)")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--resolution", type=int, help="short side in pixels (default: the model's native size)")
    s.add_argument("--width", type=int)
    s.add_argument("--height", type=int)
    s.add_argument(
        "--resize-mode",
        choices=["stretch", "crop", "fill"],
        default="stretch",
        help="how images of another aspect fit the output: stretch (default), crop the centre, or "
        "fill (pad; a mask's padding is regenerated)",
    )
    s.add_argument("--init-image", help="img2img / masked editing source (or a folder of them)")
    s.add_argument("--denoise", type=float, default=1.0, help="img2img strength in (0, 1] (default 1)")
    s.add_argument("--mask", help="white = regenerate, black = keep the init image (or a folder)")
    s.add_argument("--mask-blur", type=int, default=4, help="feather of the paste-back, px (default 4)")
    s.add_argument(
        "--no-overlay", action="store_true", help="do not paste the kept pixels back after decoding"
    )
    h = p.add_argument_group("hires fix (a second, img2img pass at a larger size)")
    h.add_argument(
        "--hires-scale", type=float, default=1.0, help="enlarge by this much and refine (default 1: off)"
    )
    h.add_argument(
        "--hires-denoise", type=float, default=0.7, help="strength of the second pass (default 0.7)"
    )
    h.add_argument("--hires-steps", type=int, help="the second pass's schedule length (default: --steps)")
    h.add_argument(
        "--hires-upscaler",
        default="latent",
        help="latent (resize the latents) | image (decode, resize the pixels, encode); default latent",
    )
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    s.add_argument("--fast", action="store_true", help="compile the networks: slow first call, faster after")
    m = p.add_argument_group("memory (for GPUs the model barely fits)")
    m.add_argument("--offload", action="store_true", help=_OFFLOAD_HELP)
    m.add_argument(
        "--vae-tiling",
        action="store_true",
        help="encode and decode images larger than the VAE's tile (the sample size in its config: "
        "512 px for SD1.x, 1024 for SDXL) in overlapping tiles: memory bounded by the tile; "
        "colours can shift and seams show",
    )
    p.add_argument("--out", default=_GENERATE_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--from-sidecar", help="replay a generation from its JSON sidecar, bit for bit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_generate)


# ---------------------------------------------------------------------------------------- train / eval
def _kv_params(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise ValueError(f"{v!r}: expected KEY=VALUE")
        k, val = v.split("=", 1)
        out[k] = val
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.recipes import RunSpec, run_training
    from .training.train import TrainConfig

    params = _kv_params(args.annotator_param)
    if args.annotator and params:
        from .annotators import get

        params = get(args.annotator).parse_params([f"{k}={v}" for k, v in params.items()])
    spec = RunSpec(
        data=args.data,
        objective=args.objective,
        base=args.base,
        arch=args.arch,
        init_controlnet=args.init_controlnet,
        hint_channels=args.hint_channels,
        global_pool=args.global_pool,
        sd_locked=args.sd_locked,
        only_mid_control=args.only_mid_control,
        empty_prompt_prob=args.empty_prompt_prob,
        noise_offset=args.noise_offset,
        resolution=args.resolution,
        annotator=args.annotator,
        annotator_params=params,
        skip_bad=args.skip_bad,
        cache=args.cache,
        validation_steps=args.validation_steps,
        validation_guidance=args.validation_guidance,
        export=args.export.split(",") if args.export else [],
    )
    cfg = TrainConfig(
        out=args.out,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        decoder_lr=args.decoder_lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        max_grad_norm=args.max_grad_norm,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        compile_mode=args.compile_mode,
        ema_decay=args.ema_decay,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        validation_count=args.validation_count,
        score_name=args.score_name,
        score_threshold=args.score_threshold,
        log_every=args.log_every,
        num_workers=args.num_workers,
        resume=args.resume,
        cpu=args.cpu,
        progress=not args.quiet,
    )
    r = run_training(spec, cfg)
    print(
        f"trained {r.state.step} steps ({r.state.samples_seen:,} samples) in {r.seconds:.0f} s, "
        f"{r.samples_per_second:.1f} samples/s; run folder {r.run_dir}"
    )
    if r.converged_at is not None:
        print(f"sudden convergence: {cfg.score_name} crossed {cfg.score_threshold} at step {r.converged_at}")
    for p in r.exported:
        print(f"exported {p}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a ControlNet (or a base model stage) on your data, on one GPU or many",
        description="Train with one loop for every objective. Several GPUs: run it under `accelerate launch` "
        "or `torchrun` (DDP; FSDP through an accelerate config). Resumable: --resume continues the run "
        "folder's newest checkpoint exactly.",
    )
    p.add_argument(
        "--data", required=True, help="prompt.json folder, metadata.jsonl/.csv folder, or image folder"
    )
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, samples, final export")
    p.add_argument(
        "--objective",
        default="controlnet",
        choices=["controlnet", "gaussian", "lite", "concat", "vae", "base"],
    )
    p.add_argument("--base", help="base model file or folder")
    p.add_argument("--arch", help="with --objective vae: a fresh base of this architecture (preset or JSON)")
    p.add_argument("--init-controlnet", help="start from this ControlNet (e.g. `controlnet init` output)")
    p.add_argument("--hint-channels", type=int, help="channels of the condition image (default 3)")
    p.add_argument("--global-pool", action="store_true", help="average residuals over space (shuffle-style)")
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
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
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
    p.add_argument("--validation-guidance", type=float, default=9.0)
    p.add_argument("--score-name", help="validation score whose first crossing is logged (e.g. iou)")
    p.add_argument("--score-threshold", type=float, help="threshold of --score-name (e.g. 0.8)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--export",
        default="controlnet",
        help="formats of the final ControlNet: controlnet,diffusers,original",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .bundled import model_settings
    from .data import open_dataset
    from .evaluation.evaluate import EvalConfig, evaluate, write_report
    from .formats import load_controlnet
    from .generation.generate import ControlRequest, GenerationRequest
    from .generation.pipeline import ModelCache, resolve_paths

    req = resolve_paths(
        GenerationRequest(
            base=args.base,
            controls=[] if args.no_controlnet else [ControlRequest(image="", controlnet=args.controlnet)],
        )
    )
    device = _device(args)
    base = ModelCache().base(req.base, torch.float32, device)  # type: ignore[arg-type]
    cn = (
        None
        if args.no_controlnet
        else load_controlnet(req.controls[0].controlnet, dtype=torch.float32, base_unet=base.unet).to(device)
    )
    guidance = model_settings(args.base).get("guidance", EvalConfig.guidance)
    cfg = EvalConfig(
        n=args.n,
        steps=args.steps,
        guidance=guidance if args.guidance is None else args.guidance,
        sampler=args.sampler,
        seed=args.seed,
        batch=args.batch,
        prompt_setting=args.prompt_setting,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        metric=args.metric,
        annotator=args.annotator,
        annotator_params=_kv_params(args.annotator_param),
    )
    dataset = open_dataset(args.data, resolution=args.resolution)
    result = evaluate(base, cn, dataset, cfg, progress=not args.quiet)
    md = write_report(
        result, args.out, title=f"evaluation of {req.controls[0].controlnet if cn else req.base}"
    )
    for k, v in result.summary.items():
        print(f"{k}: {v:.4f}")
    print(f"wrote {md}, results.json and examples.png")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure how well outputs follow their conditions",
        description="Generate one image per item of a data set and score it: fill50k IoU and "
        "colour accuracy, edge F1, SSIM, depth RMSE or segmentation mIoU.",
    )
    p.add_argument("--data", required=True, help="a data set folder (its conditions and prompts are used)")
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="default: the bundled model")
    p.add_argument("--controlnet", help="default: the bundled ControlNet")
    p.add_argument("--no-controlnet", action="store_true", help="the base model alone (prompt colours only)")
    p.add_argument(
        "--metric", default="fill50k", choices=["fill50k", "edges", "ssim", "depth", "segmentation"]
    )
    p.add_argument("--annotator", help="for ssim/depth/segmentation: the annotator that made the maps")
    p.add_argument("--annotator-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help=_GUIDANCE_HELP)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--prompt-setting", default="user", choices=["user", "none", "default"])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--resolution", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_eval)


# ------------------------------------------------------------------------------------------- serve
_APP_MISSING = "the web app needs Gradio: pip install 'controlnet[app]'"


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError(_APP_MISSING) from None

    from .serving.limits import Limits
    from .serving.server import serve
    from .serving.service import ServeConfig

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
        device=_device(args),
        dtype=args.dtype,
        offload=args.offload,
        captioner=args.captioner,
        vae=args.vae,
        loras=tuple(args.lora or ()),
        out_dir=args.out,
        limits=limits,
    )
    serve(config, host=args.host, port=args.port)  # until Ctrl-C
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .serving.limits import Limits

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
    p.add_argument("--vae", help=_VAE_HELP)
    p.add_argument("--lora", action="append", type=lora_arg, metavar="FILE[:SCALE]", help=_LORA_HELP)
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        help="ControlNet file or folder, repeatable; offered by name (default: the bundled one)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--offload", action="store_true", help=_OFFLOAD_HELP)
    p.add_argument("--captioner", help="local BLIP captioner folder, for the 'auto' prompt setting")
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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_generate,
    _add_train,
    _add_eval,
    _add_preprocess,
    _add_render,
    _add_data,
    _add_inspect,
    _add_convert,
    _add_init,
    _add_transfer,
    _add_serve,
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
