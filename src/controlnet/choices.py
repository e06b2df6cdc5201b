"""Names users give for a choice (a sampler, a control mode, ...) read into its enum, with an error
that names the setting and lists what it takes."""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

__all__ = ["parse_choice"]

E = TypeVar("E", bound=Enum)


def parse_choice(enum: type[E], value: Any, what: str) -> E:
    """``enum``'s member whose value is ``value`` (a member is returned as it is); otherwise a
    ValueError: "unknown {what} {value!r}; expected one of: ..." with every value."""
    try:
        return enum(value)
    except ValueError:
        names = ", ".join(str(e.value) for e in enum)
        raise ValueError(f"unknown {what} {value!r}; expected one of: {names}") from None
