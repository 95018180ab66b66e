"""User errors: one clear line and exit code 2 at the CLI, never a traceback."""

from __future__ import annotations


class LorankError(ValueError):
    """Bad input from the user: the message names the file, line or field and what was expected."""
