"""Fields that describe themselves: the one source of truth for a request's parameters.

A request is a dataclass whose fields are declared with :func:`param`: its default, a help text,
a short label, its bounds (numbers must be finite and within them), who sets it (the user, or the
server that runs it) and what it holds (a value, an image, a model file). From that declaration
alone the shells derive what they show and accept - the command line's flags and ``--help``, the
HTTP API's body, the web app's ranges and labels - and this module derives the rest:

- :func:`from_dict` reads a request from JSON (a sidecar, an API body) with every value's type
  checked, errors naming the field;
- :func:`to_dict` writes it back (enums as their values);
- :func:`check_fields` checks every value against its type and bounds, recursing into nested
  parts (a request's controls), errors naming the field and what was expected;
- :func:`files` lists the files a request names, by input name.

Enum-typed fields take their enum or its value as a string; a checked copy holds the members, so
code that reads a checked request always sees the enum. Fields typed ``int | str`` take a name or a
whole number (the number within the bounds); what the name means is for the code that reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from .choices import parse_choice

__all__ = [
    "Kind",
    "Owner",
    "Param",
    "check_fields",
    "enum_of",
    "field_names",
    "files",
    "from_dict",
    "map_files",
    "param",
    "params",
    "part_type",
    "to_dict",
]

T = TypeVar("T")


class Owner(Enum):
    """Who sets a field."""

    USER = "user"  # the person or program making the request
    SERVER = "server"  # ``controlnet serve`` (its models, device, dtype): API clients may not


class Kind(Enum):
    """What a field holds, as far as the shells are concerned."""

    VALUE = "value"  # a number, text, choice or flag
    IMAGE = "image"  # an image file (the command line: a path; the API: base64; the app: an upload)
    MASK = "mask"  # an image file read as a mask (white or opaque = selected)
    MODEL = "model"  # a model file or folder (the API and app: a name the server offers)
    FILE = "file"  # another file or folder (a captioner)
    PARTS = "parts"  # a list of nested parts (controls, LoRAs), each a dataclass of its own


@dataclass(frozen=True)
class Param:
    """How one field is shown and checked.

    help: one line for ``--help`` and the app's info text. label: the app's short label.
    minimum, maximum: inclusive bounds (``exclusive_minimum``: the minimum itself is refused).
    notes: words for special values, shown in bounds messages ({1: "off"} -> "between 1 (off)").
    unit: the unit named in bounds messages ("pixels").
    interval: write bounds as an interval ("in (0, 1]") rather than as comparisons.
    flag: the command line's flag, when it is not the field's name with dashes.
    item: for ``Kind.PARTS``, how one part is named in messages ("control {i}").
    group: where the command line's help and the app put it.
    cli: whether the command line has a flag for it.
    bounds: the bounds in words, where the generic wording would not do.
    """

    help: str
    label: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    notes: Mapping[float, str] = field(default_factory=dict)
    unit: str = ""
    interval: bool = False
    kind: Kind = Kind.VALUE
    owner: Owner = Owner.USER
    flag: str | None = None
    item: str = "{name}[{i}]"
    group: str = ""
    cli: bool = True
    bounds: str = ""  # the bounds in words, where the generic wording would not do

    def bounds_text(self) -> str:
        """The bounds in words: "between 64 and 4096 pixels", "in (0, 1]", ">= 1 and <= 1000"."""
        if self.bounds:
            return self.bounds
        lo, hi = self.minimum, self.maximum

        def num(v: float) -> str:
            text = f"{v:g}"
            return f"{text} ({self.notes[v]})" if v in self.notes else text

        unit = f" {self.unit}" if self.unit else ""
        if lo is not None and hi is not None:
            if self.interval:
                return f"in {'(' if self.exclusive_minimum else '['}{num(lo)}, {num(hi)}]{unit}"
            if self.notes or self.unit:
                return f"between {num(lo)} and {num(hi)}{unit}"
            return f"{'>' if self.exclusive_minimum else '>='} {num(lo)} and <= {num(hi)}{unit}"
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {num(lo)}{unit}"
        if hi is not None:
            return f"<= {num(hi)}{unit}"
        return "a finite number"

    def admits(self, value: float) -> bool:
        """Whether the number ``value`` is finite and within the bounds."""
        if not math.isfinite(value):
            return False
        if self.minimum is not None and (
            value < self.minimum or (self.exclusive_minimum and value == self.minimum)
        ):
            return False
        return self.maximum is None or value <= self.maximum


def param(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field declared with its :class:`Param` (mutable defaults: pass a factory as
    ``default_factory``)."""
    factory = kw.pop("default_factory", dataclasses.MISSING)
    spec = Param(help=help, **kw)
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"param": spec})
    return field(default=default, metadata={"param": spec})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def params(cls: type) -> dict[str, tuple[dataclasses.Field, Param, Any]]:
    """Every declared field of ``cls``: name -> (the dataclass field, its Param, its type)."""
    hints = _hints(cls)
    return {
        f.name: (f, f.metadata["param"], hints[f.name])
        for f in dataclasses.fields(cls)
        if "param" in f.metadata
    }


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return tp, False


def enum_of(tp: Any) -> type[Enum] | None:
    """The Enum a field's type holds, or None."""
    inner, _ = _unwrap(tp)
    return inner if isinstance(inner, type) and issubclass(inner, Enum) else None


def part_type(tp: Any) -> type | None:
    """The dataclass of a ``list[Part]`` field, or None."""
    inner, _ = _unwrap(tp)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        if dataclasses.is_dataclass(item):
            return item
    return None


# ---------------------------------------------------------------------------- JSON
def to_dict(obj: Any) -> dict[str, Any]:
    """``obj`` as plain JSON data: enums as their values, parts as lists of dicts."""

    def plain(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.value
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return to_dict(v)
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _name_or_number(inner: Any) -> bool:
    """Whether a field's type (``None`` taken off) is ``int | str``: a name or a whole number."""
    return set(typing.get_args(inner)) == {int, str}


def _type_name(tp: Any) -> str:
    enum = enum_of(tp)
    if enum is not None:
        return "one of: " + ", ".join(str(e.value) for e in enum)
    inner, optional = _unwrap(tp)
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}
    name = names.get(inner, "an object" if typing.get_origin(inner) is dict else "a list")
    if _name_or_number(inner):
        name = "text or a whole number"
    return f"{name} or null" if optional else name


def _words(where: str, name: str) -> str:
    """How a field is named in messages: "steps", "control 0: strength"."""
    return f"{where}: {name}" if where else name


def _read_value(tp: Any, value: Any, where: str, name: str) -> Any:
    """``value`` as type ``tp`` (enum names read into members); ValueError naming the field when
    it is not one."""
    inner, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{_words(where, name)}: expected {_type_name(tp)}, got null")
    enum = enum_of(tp)
    if enum is not None:
        if isinstance(value, enum):
            return value
        if isinstance(value, str):  # "unknown control 0 mode 'loud'; expected one of: ..."
            return parse_choice(enum, value, f"{where} {name.replace('_', ' ')}".strip())
    elif inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    elif _name_or_number(inner):
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typing.get_origin(inner) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif part_type(inner) is not None:
        if isinstance(value, list):
            return value  # read part by part by the caller
    else:  # pragma: no cover - a field of a type this module does not read
        raise TypeError(f"{_words(where, name)}: fields of type {tp!r} cannot be read")
    shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
    raise ValueError(f"{_words(where, name)}: expected {_type_name(tp)}, got {shown}")


def _build(cls: type[T], data: Mapping[str, Any], where: str, *, bounds: bool) -> T:
    """A ``cls`` from ``data`` (field name -> value), every value read as its field's type (and,
    with ``bounds``, checked against its bounds); parts are built the same way."""
    declared = params(cls)
    unknown = sorted(set(data) - set(declared))
    if unknown:
        raise ValueError(f"{_words(where, 'unknown parameters')} {unknown}")
    for name, (f, _, tp) in declared.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{_words(where, name)}: required ({_type_name(tp)})")
    values = {}
    for name, value in data.items():
        _, spec, tp = declared[name]
        value = _read_value(tp, value, where, name)
        part = part_type(tp)
        if part is not None:
            value = [_build_part(part, item, spec, name, i, bounds) for i, item in enumerate(value)]
        elif bounds and _is_number(value) and not spec.admits(value):
            raise ValueError(f"{_words(where, name)} must be {spec.bounds_text()}, got {value}")
        values[name] = value
    return cls(**values)


def _build_part(part: type, item: Any, spec: Param, name: str, i: int, bounds: bool) -> Any:
    where = spec.item.format(name=name, i=i)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        if not isinstance(item, part):
            raise ValueError(f"{where}: expected a {part.__name__}, got a {type(item).__name__}")
        item = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    elif not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    return _build(part, item, where, bounds=bounds)


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """A ``cls`` from JSON data, every value's type checked; fields not given take their
    defaults. ValueError naming the field for an unknown field or a value of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    return _build(cls, data, where, bounds=False)


# ---------------------------------------------------------------------------- checks
def check_fields(obj: T, where: str = "") -> T:
    """A copy of ``obj`` whose every declared field (and every part's) has been checked: a value
    of its type (enum names read into members), numbers finite and within their bounds.
    ValueError naming the field and what was expected otherwise."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return _build(type(obj), values, where, bounds=True)


def files(obj: Any, kinds: tuple[Kind, ...], *, with_kind: bool = False) -> dict[str, Any]:
    """The files ``obj`` names in fields of ``kinds``, by input name ("init_image",
    "controls[0].image"; a part's ``path`` field is named by the part: "loras[0]"); with
    ``with_kind``, each as (path, kind)."""
    out: dict[str, Any] = {}
    for name, (_, spec, _) in params(type(obj)).items():
        value = getattr(obj, name)
        if spec.kind is Kind.PARTS:
            for i, part in enumerate(value):
                for sub, found in files(part, kinds, with_kind=with_kind).items():
                    out[f"{name}[{i}]" + ("" if sub == "path" else f".{sub}")] = found
        elif spec.kind in kinds and value:
            out[name] = (value, spec.kind) if with_kind else value
    return out


def map_files(obj: T, kinds: tuple[Kind, ...], fn: Callable[[str, Any], Any]) -> T:
    """A copy of ``obj`` with every file :func:`files` finds replaced by ``fn(input name, path)``."""
    changes: dict[str, Any] = {}
    for name, (_, spec, _) in params(type(obj)).items():
        value = getattr(obj, name)
        if spec.kind is Kind.PARTS:
            changes[name] = [
                map_files(part, kinds, _prefixed(fn, f"{name}[{i}]")) for i, part in enumerate(value)
            ]
        elif spec.kind in kinds and value:
            changes[name] = fn(name, value)
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def _prefixed(fn: Callable[[str, Any], Any], prefix: str) -> Callable[[str, Any], Any]:
    return lambda sub, value: fn(prefix + ("" if sub == "path" else f".{sub}"), value)


def field_names(cls: type, predicate: Callable[[Param], bool]) -> list[str]:
    """The names of ``cls``'s declared fields whose Param satisfies ``predicate``, in order."""
    return [name for name, (_, spec, _) in params(cls).items() if predicate(spec)]
