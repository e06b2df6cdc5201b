"""The error types a user sees, named so that callers can catch them; each is a ValueError whose
message names the file or parameter and what was expected."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked: unreadable, of an unknown format, with missing,
    unexpected or mis-shaped keys, or of another model family. The message names the file."""
