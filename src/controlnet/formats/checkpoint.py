"""Reading and writing weight files, shared by every format: one place for each rule.

- Reading is lazy. A ``.safetensors`` file is opened with ``safe_open`` (names, shapes and dtypes
  come from its header; a tensor is read only when asked for); a torch pickle (``.ckpt``,
  ``.pth``, ``.bin``) is loaded with ``weights_only=True`` and ``mmap=True``, so its tensors stay
  in the page cache until used. Nothing is ever held twice.
- Writing is atomic: everything goes to temporary siblings first and is renamed into place only
  when all of it was written, so a failure leaves no partial output behind.
- Every problem with a file is a :class:`CheckpointError` whose message names the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..imageio import give_default_mode

__all__ = [
    "CheckpointError",
    "TensorFile",
    "atomic_outputs",
    "dump_json",
    "list_keys",
    "open_tensors",
    "read_json",
    "save_safetensors",
    "shapes_only",
]

PathLike = str | os.PathLike

#: safetensors header dtype names -> torch dtypes (those a diffusion checkpoint can hold).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def list_keys(keys: list[str] | set[str], limit: int = 20) -> str:
    """Sorted names, at most ``limit`` of them, then how many more: an error stays readable when a
    whole part of a model is missing."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)
#: Under :func:`shapes_only`, tensors of at most this many elements (schedules, markers) are read.
SMALL_TENSOR = 1 << 16


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within this block every weight is read as an empty tensor of the meta device: the loaders
    check every key and shape, build every module and read no weights (what ``inspect`` runs)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


class TensorFile:
    """The tensors of one weight file (or of a sharded set), read lazily.

    ``shapes`` and ``dtypes`` come without reading data; ``get`` reads one tensor (safetensors) or
    returns its memory-mapped view (torch pickles). ``metadata`` is the safetensors header's
    string map (empty for pickles).
    """

    def __init__(
        self,
        path: Path,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype],
        getter: Callable[[str], torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        kind: str = "safetensors",
    ) -> None:
        self.path = path
        self.shapes = shapes
        self.dtypes = dtypes
        self._get = getter
        self.metadata = dict(metadata or {})
        self.kind = kind

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        if _SHAPES_ONLY.get() and math.prod(self.shapes[key]) > SMALL_TENSOR:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key], device="meta")
        try:
            return self._get(key)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {e}") from e

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.shapes if k.startswith(prefix)]


#: the byte alignment of CPU memory torch allocates (and its kernels' widest loads expect)
_ALIGNMENT = 64


def _sniff(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle) or an error, from the first bytes: file
    extensions lie (renamed downloads), headers do not."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors first: its header's length, little-endian, may begin with the byte 0x80 that
    # also begins a pickle, but a pickle never has '{' as its ninth byte after such a length
    pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8:
            return "safetensors"
        if not pickled:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes)")
    if pickled:
        return "torch"
    raise CheckpointError(
        f"{path}: unknown file format (neither safetensors nor a torch checkpoint; first bytes {head[:8]!r})"
    )


def _open_safetensors(path: Path) -> TensorFile:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes, dtypes = {}, {}
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            sl = handle.get_slice(key)
            shapes[key] = tuple(sl.get_shape())
            if sl.get_dtype() not in _ST_DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has dtype {sl.get_dtype()}, which is not supported"
                )
            dtypes[key] = _ST_DTYPES[sl.get_dtype()]
        metadata = handle.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    with path.open("rb") as f:  # (the header was checked by safe_open above)
        n = int.from_bytes(f.read(8), "little")
        offsets = {
            k: v["data_offsets"][0] + 8 + n for k, v in json.loads(f.read(n)).items() if k != "__metadata__"
        }

    def get(key: str) -> torch.Tensor:
        """The tensor mapped from the file where it starts at an aligned address; elsewhere read
        into memory of its own. CPU kernels round by the alignment of their operands, so a tensor
        mapped at any byte would compute other last bits than the same values allocated afresh (a
        model loaded from a file, unlike the one it was saved from). Reading it (not copying the
        mapping) keeps one copy in memory."""
        mapped = handle.get_tensor(key)
        if not mapped.numel() or mapped.data_ptr() % _ALIGNMENT == 0:
            return mapped
        out = torch.empty(mapped.shape, dtype=mapped.dtype)
        del mapped
        with path.open("rb") as f:
            f.seek(offsets[key])
            got = f.readinto(out.reshape(-1).view(torch.uint8).numpy())
        if got != out.numel() * out.element_size():
            raise CheckpointError(f"{path}: tensor {key!r} is cut short (the file is truncated)")
        return out

    return TensorFile(path, shapes, dtypes, get, metadata, "safetensors")


def _unpickling_reason(e: Exception) -> str:
    """The refused global's name out of torch's long advice (which suggests trusting the file)."""
    text = str(e)
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip().removeprefix("WeightsUnpickler error:").strip().split(" was not ")[0]
    return text.splitlines()[0] if text else type(e).__name__


def _open_torch(path: Path) -> TensorFile:
    def load(mmap: bool) -> Any:
        if path.suffix == ".safetensors":  # torch reads a path by its name: a renamed pickle by hand
            with path.open("rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            obj = load(mmap=False)  # a legacy (pre-zip) pickle: read into memory, once
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: the pickle holds objects other than plain tensors, refused "
            f"({_unpickling_reason(e)}); save its state dict alone with the tool that made it"
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # arbitrary bytes make the unpickler fail in many ways (IndexError, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint ({first})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning / ldm checkpoints: weights under 'state_dict'
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: a torch checkpoint must hold a dict of tensors, found {type(obj).__name__}"
        )
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: the state dict holds entries that are not tensors: {list_keys(not_tensors)}"
        )
    tensors: dict[str, torch.Tensor] = {str(k): v for k, v in obj.items()}
    return TensorFile(
        path,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        tensors.__getitem__,
        kind="torch",
    )


#: a scaled-fp8 weight's scale, beside ``<layer>.weight``: ComfyUI's first layout, then its later one
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
#: what a scaled-fp8 file holds besides weights and their scales (input scales for fp8 matmuls,
#: markers): no weights, left out
_QUANT_EXTRAS = (".scale_input", ".input_scale", ".comfy_quant")


def _dequantized(tf: TensorFile) -> TensorFile:
    """``tf`` with its scaled-fp8 weights (``<layer>.weight`` in float8 and a scale beside it, as
    ComfyUI's ``*_fp8_scaled`` files store them) read as ``weight * scale`` in float32, and their
    scales, input scales and markers left out; ``tf`` itself when it has none."""
    scales = {
        k[: -len(suffix)] + ".weight": k
        for k in tf.shapes
        for suffix in _WEIGHT_SCALES
        if k.endswith(suffix)
        and tf.dtypes.get(k[: -len(suffix)] + ".weight") in (torch.float8_e4m3fn, torch.float8_e5m2)
    }
    if not scales:
        return tf
    extra = {k for k in tf.shapes if k.endswith(_QUANT_EXTRAS) or k.rsplit(".", 1)[-1] == "scaled_fp8"}
    keys = [k for k in tf.shapes if k not in extra and k not in scales.values()]

    def get(key: str) -> torch.Tensor:
        if key not in scales:
            return tf.get(key)
        weight, scale = tf.get(key), tf.get(scales[key])
        if weight.is_meta:
            return torch.empty(weight.shape, dtype=torch.float32, device="meta")
        scale = scale.float()
        if scale.numel() == weight.shape[0] and weight.ndim > 1:  # one scale per output row
            scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
        elif scale.numel() != 1:
            raise CheckpointError(
                f"{tf.path}: scale {scales[key]!r} has shape {tuple(scale.shape)}, expected one value "
                f"or one per row of {key!r} {tuple(weight.shape)}"
            )
        return weight.float() * scale

    return TensorFile(
        tf.path,
        {k: tf.shapes[k] for k in keys},
        {k: torch.float32 if k in scales else tf.dtypes[k] for k in keys},
        get,
        tf.metadata,
        tf.kind,
    )


def open_tensors(path: PathLike) -> TensorFile:
    """Open a weight file (safetensors or torch pickle, told apart by content) without reading it;
    scaled-fp8 weights read dequantized."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weight file")
    kind = _sniff(path)
    return _dequantized(_open_safetensors(path) if kind == "safetensors" else _open_torch(path))


def open_sharded(index: Path) -> TensorFile:
    """A sharded weight set (``*.safetensors.index.json``: key -> shard file) as one TensorFile."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' in the shard index")
    shards = {name: open_tensors(index.parent / name) for name in sorted(set(weight_map.values()))}
    shapes, dtypes, owner = {}, {}, {}
    for shard in shards.values():
        for k in shard:
            shapes[k], dtypes[k], owner[k] = shard.shapes[k], shard.dtypes[k], shard
    return TensorFile(index, shapes, dtypes, lambda k: owner[k].get(k), kind="sharded")


# ---------------------------------------------------------------------------------------- json
def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def metadata_json(tf: TensorFile, key: str) -> Any:
    """The JSON value stored under ``key`` in ``tf``'s metadata; CheckpointError naming the file
    and the key where it is missing or not JSON."""
    raw = tf.metadata.get(key)
    if raw is None:
        raise CheckpointError(f"{tf.path}: the metadata lacks {key!r}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tf.path}: metadata entry {key!r} is not JSON ({e})") from None


def pipeline_part(folder: Path, part: str) -> str | None:
    """The class a diffusers pipeline folder names for ``part`` in its model_index.json (None: no
    index, or no such part)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    entry = read_json(index).get(part)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def dump_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------- writing
def _own_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared storage; a split
    OpenCLIP in_proj or a transposed projection produces both)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for k, t in tensors.items():
        t = t.detach().contiguous()
        storage = (t.device, t.untyped_storage().data_ptr())
        if storage in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.device, t.untyped_storage().data_ptr()))
        out[k] = t.cpu()
    return out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` (call inside :func:`atomic_outputs`)."""
    save_file(_own_storage(tensors), str(path), metadata=dict(metadata or {}))
    give_default_mode(path)  # safetensors creates its files owner-only (0600)


@contextlib.contextmanager
def atomic_outputs(*dests: PathLike, overwrite: bool = False) -> Iterator[list[Path]]:
    """Temporary sibling paths for ``dests``; on success each is renamed onto its destination,
    on any error all are removed and nothing is written.

    The caller creates files or folders at the temporary paths. Existing outputs are an error
    unless ``overwrite`` (then files are replaced by an atomic rename, folders swapped).
    """
    finals = [Path(d) for d in dests]
    for d in finals:
        if d.exists() and not overwrite:
            raise CheckpointError(f"{d}: already exists; give --force to replace it")
        if not d.parent.exists():
            raise FileNotFoundError(f"{d.parent}: no such folder for the output")
    tag = uuid.uuid4().hex[:8]
    temps = [d.with_name(f".{d.name}.{tag}.tmp") for d in finals]
    try:
        yield temps
        for tmp, final in zip(temps, finals):
            if not tmp.exists():
                raise RuntimeError(f"internal error: {final} was not written")
        for tmp, final in zip(temps, finals):
            if tmp.is_file() and not final.is_dir():
                os.replace(tmp, final)  # atomic, also over an existing file
                continue
            # a folder cannot replace anything atomically: move the old output aside first
            old = final.with_name(f".{final.name}.{tag}.old")
            if final.exists() or final.is_symlink():
                final.rename(old)
            tmp.rename(final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
    finally:
        for tmp in temps:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
