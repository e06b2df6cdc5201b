"""What several subcommands share: the device default, ``KEY=VALUE`` lists, LoRA and dtype words."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..choices import DType

__all__ = [
    "DTYPES",
    "THREAD_VARIABLES",
    "add_dtype",
    "device",
    "dtype_arg",
    "free_cores",
    "kv_params",
    "lora_arg",
    "model_default_help",
    "print_written",
    "use_free_cores",
]

#: the environment variables by which a user sets the CPU thread count themselves
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def free_cores() -> int:
    """The cores this process may use that other work is not using: those it is allowed, less the
    load average of the last minute (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def use_free_cores() -> None:
    """Run CPU work on the free cores (:func:`free_cores`) unless the user chose a thread count: on
    a busy machine torch's default of one thread per core makes CPU generation several times slower
    as the threads wait for each other. Set before torch starts, so nothing is imported here."""
    if not any(v in os.environ for v in THREAD_VARIABLES):
        os.environ["OMP_NUM_THREADS"] = str(free_cores())


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


def json_object(text: str, flag: str, example: str) -> dict:
    """A flag's JSON object, or ValueError naming the flag (with ``example``, a valid value)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object, such as '{example}'")
    return value


def print_written(paths: Sequence[object], fmt: str) -> None:
    for path in paths:
        print(f"wrote {path} ({fmt})")
