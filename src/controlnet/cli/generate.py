"""``controlnet generate``: its flags are the request schema's fields, declared once in
:mod:`controlnet.generation.request`; this module only says how a field becomes a flag.

A control's fields become repeatable flags (``--image``, ``--strength``, ...), one value per
control in order (one value applies to every control); the request's own fields become one flag
each. Every flag's help ends with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from ..choices import DType
from ..generation.request import ControlRequest, GenerationRequest, LoraRequest
from ..schema import Kind, Param, enum_of, params
from . import common

__all__ = ["add", "request_from_args"]

OUT = "outputs/generate"

#: the schema's groups, as the help shows them (the order of first appearance is kept)
_GROUPS = {
    "controls": "controls (repeat per control, in order; one value applies to every control)",
    "prompt": "prompt",
    "models": "models",
    "sampling": "sampling",
    "size": "size",
    "img2img": "img2img and masked editing",
    "hires": "hires fix (a second, img2img pass at a larger size)",
    "memory": "memory (for GPUs the model barely fits)",
    "device": "device",
}
#: help beyond the schema's, where the command line reads a field its own way
_CLI_HELP = {
    "image": "; a folder: one generation per image (folders pair image by image)",
    "preprocess": "",
    "init_image": " (or a folder of them)",
    "mask": " (or a folder of them)",
    "device": "",
}


def _flag(name: str, spec: Param) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if value is None:
        return "none"
    return repr(value) if isinstance(value, str) else str(value)


def _name_or_number(text: str) -> int | str:
    """A flag that takes a name or a whole number (``--control-type depth``, ``--control-type 1``)."""
    return int(text) if text.strip().isdigit() else text


def _value_type(tp: Any) -> Any:
    """The argparse type of a field of type ``tp`` (enums stay names: the check reads them)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if enum_of(tp) is not None:
        return str
    if set(args) == {int, str}:
        return _name_or_number
    inner = args[0] if type(None) in typing.get_args(tp) else tp
    return inner if inner in (int, float, str) else str


def _help(name: str, spec: Param, field: Any) -> str:
    from ..bundled import BUNDLED_SETTINGS

    text = spec.help + _CLI_HELP.get(name, "")
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return text  # a value that must be given
    default = _default(field)
    if name in BUNDLED_SETTINGS:
        return common.model_default_help(name, text)
    if name == "device":
        return f"{text} (default: cuda when available, else cpu)"
    if "default:" in text:  # the help says what the default means
        return text
    return f"{text} (default: {_shown(default)})"


def _metavar(name: str, tp: Any) -> str:
    """What a flag takes: its choices (``{ddim,unipc,...}``; the check names a wrong one), or its
    name."""
    enum = enum_of(tp)
    return "{" + ",".join(e.value for e in enum) + "}" if enum else name.upper()


def _default(field: Any) -> Any:
    """A field's default (its factory's value); None for a field that must be given."""
    if callable(field.default_factory):
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def add(sub: argparse._SubParsersAction) -> None:
    from ..bundled import BUNDLED_MODELS

    p = sub.add_parser(
        "generate",
        help="images from a prompt and one or more condition images",
        description="Generate images with one or more ControlNets. Per-control flags repeat in order, one "
        "per control; a single value applies to all. With no --base/--controlnet the bundled model is used.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group(name: str) -> argparse._ArgumentGroup:
        if name not in groups:
            groups[name] = p.add_argument_group(_GROUPS[name])
        return groups[name]

    for name, (field, spec, tp) in params(ControlRequest).items():
        g, flag, default = group("controls"), _flag(name, spec), _default(field)
        if name == "params":
            g.add_argument(
                flag,
                dest="param",
                action="append",
                default=[],
                metavar="[I:]KEY=VALUE",
                help="an annotator parameter, for control I (0-based) or for every control",
            )
        elif tp is bool:
            g.add_argument(flag, dest=name, action="store_true", help=f"{spec.help}, for every control")
        else:
            g.add_argument(
                flag,
                dest=name,
                action="append",
                default=[],
                type=_value_type(tp),
                metavar=_metavar(name, tp),
                help=_help(name, spec, field),
            )
    for name, (field, spec, tp) in params(GenerationRequest).items():
        if not spec.cli:
            continue
        g, flag, default = group(spec.group), _flag(name, spec), _default(field)
        if name == "loras":
            g.add_argument(
                flag,
                dest=name,
                action="append",
                type=common.lora_arg,
                metavar="FILE[:SCALE]",
                help=f"{spec.help}: a LoRA file (kohya/A1111 or diffusers/PEFT layout) merged SCALE "
                f"times (default {_shown(params(LoraRequest)['scale'][0].default)}); repeat for several",
            )
        elif tp is bool and default:
            g.add_argument("--no-" + flag[2:], dest=name, action="store_false", help=f"do not {spec.help}")
        elif tp is bool:
            g.add_argument(flag, dest=name, action="store_true", help=spec.help)
        elif tp is DType:  # no default here, so that a replay can tell a dtype given from none
            common.add_dtype(g, f"{spec.help} (default: {default.value})")
        else:
            g.add_argument(
                flag,
                dest=name,
                type=_value_type(tp),
                metavar=_metavar(name, tp),
                help=_help(name, spec, field),
            )
    p.add_argument(
        "--family",
        choices=tuple(BUNDLED_MODELS),
        help="which bundled stack's files stand in where --base or --controlnet is not given: the UNet "
        "one (the default) or the Flux-style transformer one",
    )
    p.add_argument("--out", default=OUT, help="output folder (default: %(default)s)")
    p.add_argument("--from-sidecar", help="replay a generation from its JSON sidecar, bit for bit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def _flagged_request_fields() -> list[str]:
    """The request fields that have a flag and whose flag's absence means the schema's default
    (the others: bools, whose flags store their value)."""
    return [
        name
        for name, (_, spec, tp) in params(GenerationRequest).items()
        if spec.cli and tp is not bool and tp is not DType and spec.kind is not Kind.PARTS
    ]


def _control_params(values: list[str], n: int) -> list[dict[str, str]]:
    """``--param [I:]KEY=VALUE``: annotator parameters for control I (0-based), or for every
    control without ``I:``. Values stay strings; the annotator parses and checks them."""
    out: list[dict[str, str]] = [{} for _ in range(n)]
    for v in values:
        target, _, kv = v.rpartition(":") if ":" in v.split("=", 1)[0] else ("", "", v)
        if "=" not in kv:
            raise ValueError(f"--param {v!r}: expected [I:]KEY=VALUE")
        key, value = kv.split("=", 1)
        if target:
            if not target.isdigit() or int(target) >= n:
                raise ValueError(f"--param {v!r}: control index {target} is not one of 0..{n - 1}")
            out[int(target)][key] = value
        else:
            for p in out:
                p[key] = value
    return out


def _per_control(values: list, n: int, flag: str) -> list:
    """A repeatable per-control flag: none -> nothing given, one -> for all, else one each."""
    if len(values) <= 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{len(values)} values of {flag} for {n} control images: give 1 or {n}")
    return values


def _controls(args: argparse.Namespace) -> list[ControlRequest]:
    n = len(args.image)
    given: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, (_, spec, tp) in params(ControlRequest).items():
        if name in ("image", "params") or tp is bool:
            continue
        values = _per_control(getattr(args, name), n, _flag(name, spec))
        optional = type(None) in typing.get_args(tp)
        for i, v in enumerate(values):  # 'none' is no value for an optional one (a ready map)
            given[i][name] = None if optional and v == "none" else v
    params_ = _control_params(args.param, n)
    controls = []
    for i, image in enumerate(args.image):
        c = ControlRequest(image=image, guess_mode=args.guess_mode, **given[i])
        controls.append(dataclasses.replace(c, params=_parsed_params(c, params_[i], i)))
    return controls


def _parsed_params(c: ControlRequest, given: dict[str, str], i: int) -> dict[str, Any]:
    """``--param`` text values for control ``i``, parsed by its annotator, over its own params."""
    if not given:
        return c.params
    if c.preprocess is None:
        raise ValueError(
            f"--param {', '.join(given)}: control {i} has no annotator to take it (it reads its "
            "image as a ready condition map); name one with --preprocess"
        )
    from ..annotators import get

    return {**c.params, **get(c.preprocess).parse_params([f"{k}={v}" for k, v in given.items()])}


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the flags set (for a replay), by field name: a flag with no default
    given, or a switch turned."""
    out: dict[str, Any] = {}
    for name, (field, spec, tp) in params(GenerationRequest).items():
        if not spec.cli or (spec.kind is Kind.PARTS and name != "loras"):
            continue
        value = getattr(args, name)
        if name == "loras":
            if value is not None:
                out[name] = [LoraRequest(path, scale) for path, scale in value]
        elif tp is bool:
            if value != _default(field):
                out[name] = value
        elif value is not None:
            out[name] = value
    return out


def _control_overrides(args: argparse.Namespace, controls: list[ControlRequest]) -> tuple[list, list[str]]:
    """The recorded controls with the per-control flags given applied (one value: every control;
    else one per control), and the flags given."""
    n, flags = len(controls), []
    controls = list(controls)
    for name, (_, spec, tp) in params(ControlRequest).items():
        if name == "params":
            continue
        values, flag = getattr(args, name), _flag(name, spec)
        if tp is bool:
            values = [True] if values else []
        if not values:
            continue
        if n == 0:
            raise ValueError(f"{flag}: the recorded generation has no controls to change")
        flags.append(flag)
        optional = type(None) in typing.get_args(tp)
        for i, v in enumerate(_per_control(values, n, flag)):
            v = None if optional and v == "none" else v
            controls[i] = dataclasses.replace(controls[i], **{name: v})
    if args.param:
        flags.append("--param")
        for i, given in enumerate(_control_params(args.param, n)):
            controls[i] = dataclasses.replace(controls[i], params=_parsed_params(controls[i], given, i))
    return controls, flags


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags describe: the schema's defaults (the bundled model's own settings
    when it is the model used) under the flags given."""
    from ..generation.defaults import model_settings

    _bundled_stack(args)
    given = {
        name: getattr(args, name) for name in _flagged_request_fields() if getattr(args, name) is not None
    }
    flags = {
        name: getattr(args, name)
        for name, (_, spec, tp) in params(GenerationRequest).items()
        if spec.cli and (tp is bool or tp is DType) and getattr(args, name) is not None
    }
    loras = [LoraRequest(path, scale) for path, scale in args.loras or ()]
    given["device"] = common.device(args)  # cuda when available
    return GenerationRequest(
        **{**model_settings(args.base), **given, **flags}, controls=_controls(args), loras=loras
    )


def _bundled_stack(args: argparse.Namespace) -> None:
    """``--family``: that bundled stack's base and ControlNet where ``--base`` / ``--controlnet``
    are not given (a build without one of its files names it)."""
    if args.family is None:
        return
    from ..bundled import bundled_path, bundled_stack

    stack = bundled_stack(args.family)
    if args.base is None:
        args.base = str(bundled_path(stack.base))
    if args.image and not args.controlnet:  # one value serves every control
        args.controlnet = [str(bundled_path(stack.controlnet))]


def _run(args: argparse.Namespace) -> int:
    if args.from_sidecar:
        return _replay(args)
    from ..generation.pipeline import run_batch

    done = run_batch(request_from_args(args), args.out, progress=not args.quiet)
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
    """Replay a sidecar: its request, with the flags given applied over it (recorded in the new
    sidecar). Unless they change the request (a file given elsewhere with the same content, such
    as a server's model, changes nothing), the images must come out bit-identical."""
    from ..generation.check import check
    from ..generation.pipeline import run
    from ..generation.sidecar import FILE_KINDS, environment_changes, read_sidecar, verify_inputs
    from ..schema import map_files

    if args.family is not None:  # its models are the recorded ones, or those --base / --controlnet give
        raise ValueError(
            "--family: a replay runs the models its sidecar names; change them with --base / --controlnet"
        )
    record = read_sidecar(args.from_sidecar)
    given = _given(args)  # (no --device: the recorded device, not this machine's default)
    controls, control_flags = _control_overrides(args, record.request.controls)
    request = dataclasses.replace(record.request, **given, controls=controls)
    flags = [_flag(name, params(GenerationRequest)[name][1]) for name in given] + control_flags
    changed = verify_inputs(record, request)  # every file it reads, as recorded (or replaced)
    out = args.out if args.out != OUT else str(Path(args.from_sidecar).parent / "replay")
    result, sidecar = run(check(request), out, progress=not args.quiet)
    print(f"replayed {args.from_sidecar}: {len(result.images)} image(s) -> {sidecar}")

    def settings(r: GenerationRequest) -> dict[str, Any]:
        return map_files(r, FILE_KINDS, lambda *_: "").to_dict()

    if changed or settings(request) != settings(record.request):
        files = f" (new files: {', '.join(changed)})" if changed else ""
        print(f"with {', '.join(flags)} changed{files}; the new sidecar records the change")
        return 0
    stopped = record.outputs.get("stopped")
    if stopped:
        print(
            f"the recorded run was stopped after step {stopped['after_step']} of {stopped['of']}; "
            "the replay ran every step, so its images are the finished ones"
        )
        return 0
    replayed = read_sidecar(sidecar)
    new, old = replayed.outputs["images"], record.outputs.get("images", [])
    same = len(new) == len(old) and all(a["sha256"] == b["sha256"] for a, b in zip(new, old))
    if same:
        print("images are bit-identical to the recorded ones")
        return 0
    changes = environment_changes(record.environment, replayed.environment)
    why = f"the environment differs: {'; '.join(changes)}" if changes else "no recorded environment differs"
    print(f"WARNING: images differ from the recorded ones ({why})")
    return 1
