"""Key maps between a module's state dict and a file's tensors, with copy-and-verify loading.

A :class:`Rule` says where one of our tensors lives in a file and how it is stored there (as is,
as a 1x1 conv kernel, as one third of a stacked q/k/v matrix, transposed). The same rules read
and write, so a format's layout is written once. :func:`load_into` checks every key and shape
before touching the module - a missing, unexpected or mis-shaped key is an error that lists
them - then assigns the tensors to a module built on the meta device: nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .checkpoint import CheckpointError, TensorFile, list_keys

__all__ = ["Op", "Rule", "finite", "identity_rules", "load_into", "shapes_of", "to_file", "weights_on_meta"]


class Op(Enum):
    SAME = "same"
    CONV1X1 = "conv1x1"  # the file holds a (o, i, 1, 1) conv kernel, the model a (o, i) linear
    QKV = "qkv"  # the file stacks q, k, v on dim 0; the rule's tensor is one third of it
    TRANSPOSE = "transpose"  # the file holds the transpose (OpenCLIP's x @ P projection)
    ROWS = "rows"  # the rule's tensor is rows [start, stop) of the file's (fused projections)
    SWAP = "swap"  # the file holds the two halves of dim 0 the other way round (shift/scale)


@dataclass(frozen=True)
class Rule:
    ours: str
    file: str
    op: Op = Op.SAME
    third: int = 0  # which of q, k, v (Op.QKV only)
    rows: tuple[int, int] = (0, 0)  # [start, stop) of the file's dim 0 (Op.ROWS only)

    def file_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.op is Op.CONV1X1:
            return (*shape, 1, 1)
        if self.op is Op.QKV:
            return (3 * shape[0], *shape[1:])
        if self.op is Op.TRANSPOSE:
            return tuple(reversed(shape))
        if self.op is Op.ROWS:  # at least this many rows; the file's are every piece's together
            return (self.rows[1], *shape[1:])
        return tuple(shape)

    def to_model(self, t: torch.Tensor) -> torch.Tensor:
        """A view where possible: loading must not copy."""
        if self.op is Op.CONV1X1:
            return t.reshape(t.shape[0], t.shape[1])
        if self.op is Op.QKV:
            return t.chunk(3, dim=0)[self.third]
        if self.op is Op.TRANSPOSE:
            return t.t()
        if self.op is Op.ROWS:
            return t[self.rows[0] : self.rows[1]]
        if self.op is Op.SWAP:
            return _swap(t)
        return t


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


@contextmanager
def weights_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (for :func:`load_into` to fill) and
    everything else - buffers the weights do not hold, such as rotary frequencies, and plain
    tensors computed in a constructor - on the CPU with its values."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def identity_rules(keys: Iterable[str], prefix: str = "") -> list[Rule]:
    return [Rule(k, prefix + k) for k in keys]


def shapes_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of everything ``module`` saves (parameters and persistent buffers)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _verify(
    tf: TensorFile,
    rules: list[Rule],
    shapes: Mapping[str, tuple[int, ...]],
    present: Iterable[str],
    what: str,
) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for r in rules:
        shape = r.file_shape(shapes[r.ours])
        if r.op is Op.ROWS and r.file in expected:  # the pieces of one fused tensor
            shape = (max(shape[0], expected[r.file][0]), *shape[1:])
        expected[r.file] = shape
    present = set(present)
    missing = set(expected) - present
    unexpected = present - set(expected)
    mismatched = [
        f"{k}: file {tuple(tf.shapes[k])}, model {expected[k]}"
        for k in sorted(set(expected) & present)
        if tuple(tf.shapes[k]) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {list_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:10]))
    if problems:
        raise CheckpointError(f"{tf.path}: {what}: " + "; ".join(problems))


def finite(tensor: torch.Tensor, tf: TensorFile, key: str) -> torch.Tensor:
    """``tensor`` (``key`` of ``tf``), unless it holds NaN or inf: a model's weights are finite, and
    one that is not would only draw black images or train to NaN (tensors of the meta device,
    which hold no values, pass)."""
    values = tensor
    if tensor.is_floating_point() and tensor.element_size() == 1:  # float8 (e4m3, e5m2): checked widened
        values = tensor.to(torch.float16)
    if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(values).all()):
        raise CheckpointError(
            f"{tf.path}: tensor {key!r} holds NaN or infinite values; weights must be finite"
        )
    return tensor


def load_into(
    module: nn.Module,
    tf: TensorFile,
    rules_for: Callable[[list[str]], list[Rule]],
    *,
    present: Iterable[str],
    what: str,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill ``module`` (built on the meta device) with ``tf``'s tensors, exactly and completely.

    ``rules_for(our_keys)`` maps the module's keys to the file; ``present`` are the file keys that
    belong to this part (known keys the model does not use already left out). Floating-point
    tensors are cast to ``dtype`` when given, else kept as stored.
    """
    shapes = shapes_of(module)
    rules = rules_for(list(shapes))
    _verify(tf, rules, shapes, present, what)
    cache: dict[str, torch.Tensor] = {}  # a stacked q/k/v tensor is read once for its three rules
    state: dict[str, torch.Tensor] = {}
    for r in rules:
        if r.file not in cache:
            cache[r.file] = finite(tf.get(r.file), tf, r.file)
        t = r.to_model(cache[r.file])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[r.ours] = t
    module.load_state_dict(state, assign=True)
    # what the file does not hold (non-persistent buffers) the builder must have given values
    left = [n for n, t in module.named_buffers() if t.is_meta and n not in state]
    if left:  # a bug of ours, not the file's
        raise RuntimeError(f"internal error: {what}: tensors left without values: {list_keys(left)}")
    return module


def to_file(state: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The file's tensors for our ``state`` (the inverse of loading; stacks q/k/v back)."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[torch.Tensor | None]] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for r in rules:
        t = state[r.ours]
        if r.op is Op.ROWS:
            pieces.setdefault(r.file, []).append((r.rows[0], t))
        elif r.op is Op.SWAP:
            out[r.file] = _swap(t)
        elif r.op is Op.QKV:
            stacks.setdefault(r.file, [None, None, None])[r.third] = t
        elif r.op is Op.CONV1X1:
            out[r.file] = t[:, :, None, None]
        elif r.op is Op.TRANSPOSE:
            out[r.file] = t.t().contiguous()
        else:
            out[r.file] = t
    for key, parts in stacks.items():
        if any(p is None for p in parts):
            raise RuntimeError(f"internal error: incomplete q/k/v for {key}")
        out[key] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    for key, found in pieces.items():
        out[key] = torch.cat([t for _, t in sorted(found, key=lambda p: p[0])], dim=0)
    return out
