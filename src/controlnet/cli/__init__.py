"""The ``controlnet`` command: a thin shell over the library. No model logic lives here.

One module per family of subcommands; each has an ``add(subparsers)`` that declares its commands
and their handlers. Handlers import what they need when they run, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from .. import __version__
from . import conditions, data, demo, files, generate, serve, train

__all__ = ["build_parser", "entry", "main"]

Handler = Callable[[argparse.Namespace], int]

#: the subcommands in the order ``--help`` lists them
_COMMANDS = (demo, generate, train, conditions, data, files, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnet",
        description="ControlNet for Stable Diffusion-family models: generate, prepare conditions, "
        "train, convert and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"controlnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.add(sub)
    for p in [parser, *sub.choices.values()]:  # before or after the command's name
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            if not getattr(args, "debug", False):
                warnings.showwarning = _warning_printer(args.command)
            return handler(args)
    except KeyboardInterrupt as e:  # Ctrl-C; a training run says which checkpoint it wrote
        print(f"controlnet {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output stopped reading (``| head``): no more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"controlnet {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1


def entry() -> int:
    """The ``controlnet`` command: :func:`main` on the free CPU cores
    (:func:`~controlnet.cli.common.use_free_cores`)."""
    from .common import use_free_cores

    use_free_cores()
    return main()


def _warning_printer(command: str) -> Callable[..., None]:
    """Warnings as one line on stderr, ``controlnet CMD: warning: ...`` (--debug: Python's own)."""

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        print(f"controlnet {command}: warning: {message}", file=sys.stderr)

    return show


def _one_line(e: Exception) -> str:
    """A user error's message (one line, naming what was wrong), or, for anything else, the
    exception's first line and where to see the rest."""
    text = str(e).strip()
    if isinstance(e, (ValueError, FileNotFoundError)):
        return " ".join(text.split("\n"))
    first = text.splitlines()[0] if text else ""
    return f"internal error: {type(e).__name__}: {first} (run again with --debug for the traceback)"
