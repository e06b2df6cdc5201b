"""The error types a user sees, named so that callers can catch them; each is a ValueError whose
message names the file or parameter and what was expected."""

from __future__ import annotations

import re

__all__ = ["CheckpointError", "SettingError"]


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked: unreadable, of an unknown format, with missing,
    unexpected or mis-shaped keys, or of another model family. The message names the file, in one
    line: line breaks that come from the file itself (a header's text quoted by a reader) are
    shown escaped."""

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class SettingError(ValueError):
    """A setting out of its range. ``names`` are the settings' names in the Python API (fields of
    a config), so that a front end can say them its own way (the command line: its flags)."""

    def __init__(self, message: str, *names: str) -> None:
        super().__init__(message)
        self.names = names

    def spoken(self, say: dict[str, str]) -> str:
        """The message with each of ``names`` that ``say`` maps replaced by what it maps to."""
        text = str(self)
        for name in sorted(self.names, key=len, reverse=True):
            if name in say:
                text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", say[name], text)
        return text
