"""``controlnet inspect | convert | init | transfer``: checkpoint files in every layout."""

from __future__ import annotations

import argparse

from . import common

_FORMATS = ("original", "diffusers", "controlnet")


def _dtype(value):
    """The torch dtype of a ``--dtype`` value, or None (keep the tensors' own)."""
    return None if value is None else value.torch


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..formats import inspect_checkpoint

    found = inspect_checkpoint(args.file, ldm_config=args.config)
    print("\n".join(found.lines()))
    return 1 if found.refused else 0


_CONFIG_HELP = (
    "the original YAML (ldm / sgm / cldm) of an original-layout file, for what its tensors do not "
    "tell (attention heads, ...); default: the same-named .yaml beside it, if any"
)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="tell what a checkpoint file or folder holds, and whether it loads (exit 1 if a part "
        "would be refused)",
    )
    p.add_argument("file", help="weight file (.safetensors, .ckpt, .pth) or diffusers folder")
    p.add_argument("--config", metavar="YAML", help=_CONFIG_HELP)
    p.set_defaults(handler=_cmd_inspect)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..formats import convert

    paths = convert(
        args.src,
        args.dst,
        args.to,
        part=args.part,
        dtype=_dtype(args.dtype),
        overwrite=args.force,
        base=args.base,
        settings=_settings_arg(args.settings),
        ldm_config=args.config,
    )
    common.print_written(paths, args.to)
    return 0


def _settings_arg(text: str | None) -> dict | None:
    """``--settings``: a JSON object of generation settings."""
    if text is None:
        return None
    value = common.json_object(text, "--settings", '{"guidance": 1.5}')
    from ..generation.defaults import check_settings

    return check_settings(value, "--settings")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a ControlNet or base model in another format")
    p.add_argument("src", metavar="IN")
    p.add_argument("dst", metavar="OUT", help="*.safetensors, or a folder for --to diffusers")
    p.add_argument("--to", choices=_FORMATS, required=True, help="output format ('controlnet' is ours)")
    p.add_argument(
        "--part", choices=("controlnet", "base"), help="of a file holding both (default: controlnet)"
    )
    common.add_dtype(p, "cast floating-point tensors (default: keep)")
    p.add_argument(
        "--base", help="IN a Control-LoRA: the base model it is built on (written out as a whole ControlNet)"
    )
    p.add_argument(
        "--settings",
        metavar="JSON",
        help='a base model\'s generation settings, such as \'{"guidance": 1.5, "negative_prompt": ""}\': '
        "kept in our format's metadata and applied wherever the model is loaded (replacing those "
        "it carries; '{}' clears them)",
    )
    p.add_argument("--config", metavar="YAML", help=_CONFIG_HELP)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_convert)


def _transformer_config(family: str, args: argparse.Namespace):
    """The ControlNet config of a transformer family from ``init``'s flags."""
    if args.hint_channels != 3 or args.global_pool or args.with_base:
        raise ValueError("--hint-channels, --global-pool and --with-base are for UNet ControlNets")
    if family == "flux":
        from ..families.flux import FluxControlNetConfig

        return FluxControlNetConfig(args.blocks or 2, args.single_blocks or 0, args.union_modes)
    if args.single_blocks or args.union_modes:
        raise ValueError("--single-blocks and --union-modes are for Flux ControlNets")
    from ..families.sd3 import SD3ControlNetConfig

    return SD3ControlNetConfig(num_layers=args.blocks or 12)


def _cmd_init(args: argparse.Namespace) -> int:
    from ..families.sd.controlnet import ControlNetConfig
    from ..formats import detect, init_controlnet, load_base, save_controlnet

    family = detect(args.base).family
    if family != "sd":
        cn = init_controlnet(
            args.base, config=_transformer_config(family, args), seed=args.seed, dtype=_dtype(args.dtype)
        )
        common.print_written(save_controlnet(cn, args.out, args.to, overwrite=args.force), args.to)
        return 0
    if args.blocks or args.single_blocks or args.union_modes:
        raise ValueError(
            "--blocks, --single-blocks and --union-modes are for transformer ControlNets (Flux, SD3)"
        )
    base = load_base(args.base, dtype=_dtype(args.dtype)) if args.with_base else args.base
    config = ControlNetConfig(hint_channels=args.hint_channels, global_pool=args.global_pool)
    cn = init_controlnet(base, config=config, seed=args.seed, dtype=_dtype(args.dtype))
    embed = base if args.with_base else None
    common.print_written(save_controlnet(cn, args.out, args.to, base=embed, overwrite=args.force), args.to)
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
    common.add_dtype(p, "cast floating-point tensors (default: keep)")
    p.add_argument("--with-base", action="store_true", help="--to original: embed the base, as v1.0 files do")
    p.add_argument(
        "--blocks", type=int, help="transformer bases: the (double / joint) blocks copied (Flux: 2, SD3: 12)"
    )
    p.add_argument("--single-blocks", type=int, help="Flux: the single-stream blocks copied (default: 0)")
    p.add_argument("--union-modes", type=int, help="Flux: a Union ControlNet of this many control modes")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_init)


def _cmd_transfer(args: argparse.Namespace) -> int:
    from ..formats import load_base, save_controlnet, transfer_controlnet

    to_base = load_base(args.to_base) if args.with_base else args.to_base
    cn = transfer_controlnet(args.control, args.from_base, to_base)
    if args.dtype:
        cn = cn.to(_dtype(args.dtype))
    embed = to_base if args.with_base else None
    common.print_written(save_controlnet(cn, args.out, args.to, base=embed, overwrite=args.force), args.to)
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
    common.add_dtype(p, "cast floating-point tensors (default: the ControlNet's)")
    p.add_argument("--with-base", action="store_true", help="--to original: embed base B, as v1.0 files do")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_transfer)


def add(sub: argparse._SubParsersAction) -> None:
    _add_inspect(sub)
    _add_convert(sub)
    _add_init(sub)
    _add_transfer(sub)
