"""Training data: (target image, condition, prompt) triples from a folder, as a torch Dataset.

:func:`open_dataset` reads any of these layouts (the first found wins):

``prompt.json``
    The released ControlNet tutorial layout: JSON lines ``{"source": ..., "target": ...,
    "prompt": ...}``, paths relative to the folder.
``metadata.jsonl`` / ``metadata.csv``
    diffusers' column names ``image``, ``conditioning_image``, ``text`` (``target`` / ``file_name``,
    ``source`` and ``prompt`` are accepted too).
a plain folder of images
    Every image under the folder is a target; its condition is computed on the fly by an
    annotator; its prompt is the text of a same-stem ``.txt`` file beside it, or empty.

With an annotator, the condition of every layout is computed from the target (after resizing) and
any stored condition is ignored. Everything is checked when the dataset is opened (every line
parsed, every image header read), so a bad entry is an error naming its file and line before any
training starts; ``skip_bad=True`` drops such entries instead and lists them in ``skipped``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..annotators.utils import resize_center_crop
from ..imageio import IMAGE_SUFFIXES, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "ControlDataset",
    "DatasetError",
    "Entry",
    "Layout",
    "Skipped",
    "open_dataset",
    "resize_center_crop",
]

# Accepted column names, preferred first.
_TARGET_KEYS = ("image", "target", "file_name")
_COND_KEYS = ("conditioning_image", "source")
_PROMPT_KEYS = ("text", "prompt")

#: An annotator: (H, W, 3) uint8 RGB -> (H, W, 3) uint8 condition (or (H, W)).
Annotator = Callable[..., np.ndarray]


class DatasetError(ValueError):
    """A bad data set entry or layout; the message names the file and, for index files, the line."""


class Layout(Enum):
    PROMPT_JSON = "prompt.json"
    METADATA_JSONL = "metadata.jsonl"
    METADATA_CSV = "metadata.csv"
    IMAGE_FOLDER = "image folder"


@dataclass(frozen=True)
class Entry:
    """One training example on disk. ``cond`` is None when an annotator computes the condition;
    ``where`` says where it was listed ("prompt.json line 7", or the image's relative path)."""

    target: Path
    cond: Path | None
    prompt: str
    where: str


@dataclass(frozen=True)
class Skipped:
    """An entry dropped by ``skip_bad``, and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class _Bad(Exception):
    """Why one entry is unusable (becomes a DatasetError or a Skipped)."""


# ---------------------------------------------------------------------------------------- geometry
def _header_size(path: Path, name: str) -> tuple[int, int]:
    """(width, height) from the image header only (cheap); _Bad naming ``name`` otherwise."""
    if not path.is_file():
        raise _Bad(f"no such image: {name}")
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise _Bad(f"cannot read {name} as an image ({e})") from None


# ---------------------------------------------------------------------------------------- index files
def _pick(row: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in row), None)


def _key_names(keys: Sequence[str]) -> str:
    return f"{keys[0]!r} (or {', '.join(repr(k) for k in keys[1:])})"


def _entry(row: Mapping[str, Any], root: Path, where: str, need_cond: bool) -> Entry:
    """A row of an index file -> Entry, or _Bad naming the missing or empty field."""
    values = {}
    for what, keys in (("target", _TARGET_KEYS), ("cond", _COND_KEYS), ("prompt", _PROMPT_KEYS)):
        key = _pick(row, keys)
        if key is None:
            if what == "cond" and not need_cond:
                values[what] = None
                continue
            raise _Bad(f"no {_key_names(keys)} field")
        value = row[key]
        if not isinstance(value, str):
            raise _Bad(f"{key!r} must be a string, got {value!r}")
        if what != "prompt" and not value:
            raise _Bad(f"empty {key!r}")
        values[what] = value
    return Entry(
        target=root / values["target"],
        cond=root / values["cond"] if need_cond else None,
        prompt=values["prompt"],
        where=where,
    )


def _jsonl_rows(index: Path) -> Iterator[tuple[str, Mapping[str, Any] | _Bad]]:
    with open(index, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{index} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _Bad(f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            yield where, row if isinstance(row, dict) else _Bad(f"not a JSON object: {line.strip()[:60]}")


def _csv_rows(index: Path, need_cond: bool) -> Iterator[tuple[str, Mapping[str, Any] | _Bad]]:
    with open(index, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        required = [_TARGET_KEYS, _PROMPT_KEYS] + ([_COND_KEYS] if need_cond else [])
        for keys in required:
            if _pick(dict.fromkeys(header), keys) is None:  # the whole file is unusable: never skipped
                raise DatasetError(f"{index} line 1: no {_key_names(keys)} column (columns: {header})")
        for row in reader:
            where = f"{index} line {reader.line_num}"
            if None in row.values():
                yield where, _Bad(f"{len(header)} columns expected, fewer found")
            elif None in row:
                yield where, _Bad(f"{len(header)} columns expected, more found")
            else:
                yield where, row


def _folder_entries(root: Path) -> Iterator[tuple[str, Entry | _Bad]]:
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for img in images:
        where = str(img.relative_to(root))
        prompt = ""
        txt = img.with_suffix(".txt")
        if txt.is_file():
            try:
                prompt = txt.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                yield where, _Bad(f"{txt.name}: unreadable prompt file ({e})")
                continue
            if not prompt:
                yield where, _Bad(f"{txt.name}: empty prompt file")
                continue
        yield where, Entry(target=img, cond=None, prompt=prompt, where=where)


def _find_index(path: Path) -> tuple[Layout, Path]:
    """The layout of ``path`` (a folder, or an index file inside one) and its index file or folder."""
    if path.is_file():
        by_name = {
            "prompt.json": Layout.PROMPT_JSON,
            ".jsonl": Layout.METADATA_JSONL,
            ".csv": Layout.METADATA_CSV,
        }
        layout = by_name.get(path.name) or by_name.get(path.suffix.lower())
        if layout is None:
            raise DatasetError(f"{path}: not a data set index (prompt.json, *.jsonl or *.csv)")
        return layout, path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such data set folder")
    for layout in (Layout.PROMPT_JSON, Layout.METADATA_JSONL, Layout.METADATA_CSV):
        if (path / layout.value).is_file():
            return layout, path / layout.value
    return Layout.IMAGE_FOLDER, path


# ---------------------------------------------------------------------------------------- opening
def open_dataset(
    path: str | Path,
    *,
    resolution: int | None = None,
    annotator: str | Annotator | None = None,
    annotator_params: Mapping[str, Any] | None = None,
    skip_bad: bool = False,
    nearest_condition: bool = False,
) -> ControlDataset:
    """Open a data set folder (or its index file) in any of the layouts above.

    resolution: resize the short side to this and crop the centre square (both images, one
        geometry); None keeps every image's size (items must then share one size to be batched).
    annotator: computes conditions from targets: a callable ``(H, W, 3) uint8 -> (H, W, 3) uint8``
        called with ``annotator_params`` as keywords (and ``seed=index`` if it has a ``seed``
        parameter), or a name for ``controlnet.annotators.annotate``. Required for a plain folder.
    skip_bad: drop bad entries (unparsable line, missing field, missing or unreadable image,
        condition and target of different sizes, empty prompt file) and list them in
        ``dataset.skipped`` instead of raising :class:`DatasetError`.
    nearest_condition: resize conditions with nearest neighbour (label maps) rather than area/Lanczos.
    """
    root = Path(path)
    layout, index = _find_index(root)
    if index.is_file():
        root = index.parent
    if resolution is not None and resolution < 8:
        raise DatasetError(f"resolution must be at least 8 pixels, got {resolution}")
    need_cond = annotator is None
    if layout is Layout.IMAGE_FOLDER and need_cond:
        raise DatasetError(
            f"{root}: no prompt.json, metadata.jsonl or metadata.csv; a plain image folder needs an "
            "annotator to compute its conditions"
        )

    if layout is Layout.IMAGE_FOLDER:
        listed: Iterator[tuple[str, Entry | Mapping[str, Any] | _Bad]] = _folder_entries(root)
    elif layout is Layout.METADATA_CSV:
        listed = _csv_rows(index, need_cond)
    else:
        listed = _jsonl_rows(index)

    entries: list[Entry] = []
    skipped: list[Skipped] = []
    for where, item in listed:
        try:
            if isinstance(item, _Bad):
                raise item
            entry = item if isinstance(item, Entry) else _entry(item, root, where, need_cond)
            _check_images(entry, root)
            entries.append(entry)
        except _Bad as e:
            if not skip_bad:
                raise DatasetError(f"{where}: {e}") from None
            skipped.append(Skipped(where, str(e)))
    if not entries:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise DatasetError(f"{index}: no usable entries ({len(skipped)} skipped{first})")
    return ControlDataset(
        root=root,
        layout=layout,
        entries=entries,
        skipped=skipped,
        resolution=resolution,
        annotator=annotator,
        annotator_params=dict(annotator_params or {}),
        nearest_condition=nearest_condition,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _check_images(entry: Entry, root: Path) -> None:
    size = _header_size(entry.target, _relative(entry.target, root))
    if entry.cond is not None:
        cond_size = _header_size(entry.cond, _relative(entry.cond, root))
        if cond_size != size:
            raise _Bad(
                f"condition {_relative(entry.cond, root)} is {cond_size[0]}x{cond_size[1]} but target "
                f"{_relative(entry.target, root)} is {size[0]}x{size[1]}"
            )


# ---------------------------------------------------------------------------------------- dataset
class ControlDataset(Dataset):
    """Items ``{"target": (3, H, W) float in [-1, 1], "cond": (3, H, W) float in [0, 1],
    "prompt": str, "index": int}``; loading is deterministic (no random crops or flips).

    ``skipped`` lists the entries ``skip_bad`` dropped. Build with :func:`open_dataset`.
    """

    def __init__(
        self,
        *,
        root: Path,
        layout: Layout,
        entries: Sequence[Entry],
        skipped: Sequence[Skipped] = (),
        resolution: int | None = None,
        annotator: str | Annotator | None = None,
        annotator_params: Mapping[str, Any] | None = None,
        nearest_condition: bool = False,
    ) -> None:
        self.root = root
        self.layout = layout
        self.entries = tuple(entries)
        self.skipped = list(skipped)
        self.resolution = resolution
        self.annotator = annotator
        self.annotator_params = dict(annotator_params or {})
        self.nearest_condition = nearest_condition

    def __len__(self) -> int:
        return len(self.entries)

    def prompt(self, i: int) -> str:
        """Item ``i``'s prompt, without loading its images."""
        return self.entries[i].prompt

    def load_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i`` as (target, cond) (H, W, 3) uint8 arrays, resized and annotated."""
        e = self.entries[i]
        target = self._read(e.target, e)
        if e.cond is None:
            if self.resolution is not None:
                target = resize_center_crop(target, self.resolution)
            return target, self._annotate(target, i, e)
        cond = self._read(e.cond, e)
        if cond.shape != target.shape:
            raise DatasetError(
                f"{e.where}: condition {_relative(e.cond, self.root)} is {cond.shape[1]}x{cond.shape[0]} "
                f"but target {_relative(e.target, self.root)} is {target.shape[1]}x{target.shape[0]}"
            )
        if self.resolution is not None:
            target = resize_center_crop(target, self.resolution)
            cond = resize_center_crop(cond, self.resolution, nearest=self.nearest_condition)
        return target, cond

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        target, cond = self.load_arrays(i)
        return {
            "target": torch.from_numpy(target.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0,
            "cond": torch.from_numpy(cond.transpose(2, 0, 1).copy()).float() / 255.0,
            "prompt": self.entries[i].prompt,
            "index": i,
        }

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Items -> ``{"target": (B, 3, H, W), "cond": (B, 3, H, W), "prompt": [B str], "index": (B,)}``."""
        sizes = {tuple(it["target"].shape[1:]) for it in items}
        if len(sizes) > 1:
            raise DatasetError(
                f"cannot batch items of different sizes {sorted(sizes)}: open the data set with a resolution"
            )
        return {
            "target": torch.stack([it["target"] for it in items]),
            "cond": torch.stack([it["cond"] for it in items]),
            "prompt": [it["prompt"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """SHA-256 of what the items depend on: layout, every entry's files (relative path and byte
        size) and prompt, resolution, condition resizing and annotator. Pixel contents are not
        read (cheap on 50,000 images): an image replaced by another of the same byte size is not seen."""
        h = hashlib.sha256()
        spec = {
            "layout": self.layout.value,
            "resolution": self.resolution,
            "nearest_condition": self.nearest_condition,
            "annotator": _annotator_id(self.annotator),
            "annotator_params": repr(sorted(self.annotator_params.items())),
        }
        h.update(json.dumps(spec, sort_keys=True).encode())
        for e in self.entries:
            files = [e.target] + ([e.cond] if e.cond is not None else [])
            record = [e.prompt] + [[_relative(f, self.root), _file_size(f)] for f in files]
            h.update(json.dumps(record).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ internals
    def _read(self, path: Path, e: Entry) -> np.ndarray:
        try:
            return read_image(path)
        except (ValueError, FileNotFoundError) as err:
            raise DatasetError(f"{e.where}: {err}") from None

    @functools.cached_property
    def _annotator_fn(self) -> tuple[Annotator, bool]:
        fn: Annotator
        if callable(self.annotator):
            fn = self.annotator
        else:
            try:
                from controlnet.annotators import annotate
            except ImportError as err:
                raise DatasetError(
                    f"annotator {self.annotator!r}: annotators are not available ({err})"
                ) from None
            fn = functools.partial(annotate, self.annotator)
        try:
            wants_seed = "seed" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # some builtins have no signature
            wants_seed = False
        return fn, wants_seed

    def _annotate(self, image: np.ndarray, i: int, e: Entry) -> np.ndarray:
        fn, wants_seed = self._annotator_fn
        kwargs = {**self.annotator_params, **({"seed": i} if wants_seed else {})}
        out = np.asarray(fn(image.copy(), **kwargs))
        if out.ndim == 3 and out.shape[2] == 1:
            out = out[..., 0]
        if out.ndim == 2:
            out = np.repeat(out[..., None], 3, axis=2)
        if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
            raise DatasetError(
                f"{e.where}: the annotator returned {out.shape} {out.dtype}, not (H, W, 3) uint8"
            )
        if out.shape[:2] != image.shape[:2]:
            raise DatasetError(
                f"{e.where}: the annotator returned a {out.shape[1]}x{out.shape[0]} condition for a "
                f"{image.shape[1]}x{image.shape[0]} image"
            )
        return np.ascontiguousarray(out)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: resolve the annotator afresh
        state = self.__dict__.copy()
        state.pop("_annotator_fn", None)
        return state


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _annotator_id(annotator: str | Annotator | None) -> str | None:
    if annotator is None or isinstance(annotator, str):
        return annotator
    fn = annotator.func if isinstance(annotator, functools.partial) else annotator
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
