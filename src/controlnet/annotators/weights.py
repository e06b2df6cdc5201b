"""Where learned annotators find their weights, and how the files are read. Nothing downloads.

Users download the released files themselves (most are in the ``lllyasviel/Annotators``
repository on the Hugging Face Hub) and either put them in the annotator folder or pass a path
as the ``weights`` parameter. The folder is ``$CONTROLNET_ANNOTATOR_DIR`` when set, else
``~/.cache/controlnet/annotators``.

Weight files are read with ``torch.load(weights_only=True)`` or safetensors, and every tensor
is checked against the module's own layout before it is copied (no partial loading).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "annotator_dir",
    "cached",
    "default_device",
    "find_weights",
    "load_state_dict",
    "load_strict",
    "offered_weights",
]

ENV_DIR = "CONTROLNET_ANNOTATOR_DIR"

T = TypeVar("T")


def annotator_dir() -> Path:
    """The folder searched for weights given by bare file name."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "controlnet" / "annotators"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_weights(value: str, *, what: str, get: str, folder: bool = False) -> Path:
    """Resolve a ``weights`` parameter to an existing file (or folder).

    ``value`` is a path; a relative one that does not exist as given is looked up in
    :func:`annotator_dir`. When nothing is found the FileNotFoundError says what to download
    (``get``) and where to put it.
    """
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [path, annotator_dir() / path]
    for c in candidates:
        if (c.is_dir() if folder else c.is_file()) and (not folder or (c / "config.json").is_file()):
            return c
    target = path if path.is_absolute() else annotator_dir() / path
    kind = "folder (config.json + weights)" if folder else "file"
    raise FileNotFoundError(
        f"{what} weights not found at {target}. Get {get} and save the {kind} there "
        f"(the annotator folder is ${ENV_DIR} when set), or give its path with weights=PATH "
        f"(CLI: --param weights=PATH). Nothing is downloaded."
    )


def offered_weights(paths: Sequence[str | Path] = ()) -> dict[str, Path]:
    """The weights a server offers to its clients, by name: every file, and every model folder
    (one holding a config.json), directly in :func:`annotator_dir`, then each of ``paths`` (the
    operator's own); a name is the file or folder name. A client chooses among these names and
    never names a path, so it learns nothing of the server's files."""
    offered: dict[str, Path] = {}
    folder = annotator_dir()
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.is_file() or (entry / "config.json").is_file():
                offered[entry.name] = entry.resolve()
    given: dict[str, Path] = {}
    for value in paths:
        path = Path(value).expanduser()
        if not (path.is_file() or (path / "config.json").is_file()):
            raise FileNotFoundError(
                f"annotator weights {value}: not a file, nor a model folder holding a config.json"
            )
        if path.name in given and given[path.name] != path.resolve():
            raise ValueError(f"annotator weights {value}: a second file named {path.name}; rename one")
        given[path.name] = path.resolve()
    return {**offered, **given}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (read with ``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            # a header's own text may be quoted in the reason: CheckpointError keeps it one line
            raise CheckpointError(f"cannot read {path.name} as a safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
        raise ValueError(f"cannot read {path.name} as a weights file ({e.__class__.__name__})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path.name} does not hold a state dict of tensors")
    return sd


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Copy every tensor of ``state`` into ``module`` after checking names and shapes match exactly."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ValueError(f"not a {what} weight file: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=True)
    return module


def cached(loader: Callable[[str, float], T]) -> Callable[[Path], T]:
    """Memoise a loader by (path, modification time), so a web app loads each model once; a
    replaced file (or a file replaced inside a model folder) is loaded afresh. Whatever fails in
    the loader is a ValueError naming the file: weights that cannot be read are bad input."""
    memo = lru_cache(maxsize=4)(loader)

    def load(path: Path) -> T:
        path = path.resolve()
        files = [path, *path.iterdir()] if path.is_dir() else [path]
        try:
            return memo(str(path), max(f.stat().st_mtime for f in files))
        except ValueError as e:
            raise ValueError(str(e) if path.name in str(e) else f"{path.name}: {e}") from None
        except (MemoryError, torch.OutOfMemoryError):  # the machine, not the file
            raise
        except Exception as e:  # a file the loader does not expect: its error, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"cannot load weights {path.name} ({type(e).__name__}: {first})") from None

    load.cache_clear = memo.cache_clear  # type: ignore[attr-defined]
    return load
