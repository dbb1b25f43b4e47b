"""The one error type a user can cause.

Every check of user input (a path, a model id, an image, a config value, a
checkpoint, a shard, a SQL query) raises a subclass of :class:`UserError`, and
``str(exc)`` is one line that names the bad thing. The ``atr`` CLI prints
exactly those as ``error: ...`` with exit code 2. Anything else that escapes a
command is a bug in atr: the CLI prints its traceback and asks for a report.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; ``str(exc)`` is one line naming it."""


class MissingFile(UserError, FileNotFoundError):
    """A path the user named does not exist."""


__all__ = ["UserError", "MissingFile"]
