"""User-facing errors.

Anything a user can cause with bad input (a config, a data file, a model path) raises a
`SuretrapError` whose message is one line naming the file:line or the config field.
The CLI prints that line and exits with status 2; it never shows a traceback for them.
"""

from __future__ import annotations


class SuretrapError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class ConfigError(SuretrapError):
    """A config file is malformed or holds an invalid value."""


class DataError(SuretrapError):
    """A data file is missing, malformed, or does not hold what was asked of it."""


class ModelError(SuretrapError):
    """A model or adapter cannot be found or loaded."""


def where(path: object, line: int | None = None) -> str:
    """Format a location as ``path`` or ``path:line`` for error messages."""
    return f"{path}:{line}" if line is not None else f"{path}"
