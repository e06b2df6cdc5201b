"""What several subcommands share: the device default, ``KEY=VALUE`` lists, LoRA and dtype words."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from ..choices import DType

__all__ = [
    "DTYPES",
    "add_dtype",
    "device",
    "dtype_arg",
    "kv_params",
    "lora_arg",
    "model_default_help",
    "print_written",
]

#: the dtype words the command line offers (older spellings such as fp16 are read too)
DTYPES = tuple(d.value for d in DType)

_LORA_SPEC = re.compile(r"^(?P<path>.+):(?P<scale>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def device(args: argparse.Namespace) -> str:
    """--device, else cuda when available."""
    from ..annotators.weights import default_device

    return args.device or str(default_device())


def dtype_arg(text: str) -> DType:
    """A ``--dtype`` value: float32, float16 or bfloat16 (fp32, fp16, bf16 are read too)."""
    try:
        return DType.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_dtype(parser: argparse.ArgumentParser, help: str, default: DType | None = None) -> None:
    """A ``--dtype`` flag in the one dtype vocabulary (float32, float16, bfloat16)."""
    shown = f" (default: {default.value})" if default is not None else ""
    parser.add_argument(
        "--dtype", type=dtype_arg, default=default, metavar="{" + ",".join(DTYPES) + "}", help=help + shown
    )


def model_default_help(name: str, text: str) -> str:
    """Help for a setting whose default depends on the model: SD's, or the bundled model's."""
    from ..bundled import BUNDLED_SETTINGS
    from ..generation.request import GenerationRequest
    from ..schema import params

    default = params(GenerationRequest)[name][0].default
    bundled = BUNDLED_SETTINGS[name]
    return f"{text} (default: {default!r}; {bundled!r} for the bundled model, used without --base)"


def lora_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale); a name that exists as written is a file, whole."""
    m = _LORA_SPEC.match(text)
    if m is None or Path(text).exists():
        return text, 1.0
    return m["path"], float(m["scale"])


def kv_params(values: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> a dict (values stay strings: their reader parses them)."""
    out = {}
    for v in values:
        if "=" not in v:
            raise ValueError(f"{v!r}: expected KEY=VALUE")
        k, val = v.split("=", 1)
        out[k] = val
    return out


def print_written(paths: Sequence[object], fmt: str) -> None:
    for path in paths:
        print(f"wrote {path} ({fmt})")
