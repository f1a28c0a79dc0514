"""User-facing errors.

Anything a user can fix (a wrong path, a bad file, an unsupported model) raises `ExqError`; the CLI prints its message
and hint without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ExqError(Exception):
    """A problem with the user's input, with a message that names it and a hint that says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class FormatError(ExqError):
    """A file exq wrote (or should have written) is missing, corrupt, of another schema version or of another model."""
