"""Errors caused by the user's input (files, configs, flags).

The CLI turns every `UserError` into one line on stderr and exit status 2, so a user
never sees a traceback for a mistake of theirs. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us; its message is shown as one line."""


class DataError(UserError):
    """A bad record in a data file. Names the file, the line (or row) and the field."""

    def __init__(self, path, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class ConfigError(UserError):
    """A bad config file, key or value."""
