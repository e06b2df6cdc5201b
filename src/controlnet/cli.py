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
