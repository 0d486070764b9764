"""Errors a user can cause, kept apart from bugs.

The CLI prints a ``UserError`` as one line and exits with status 1; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: a bad path, key, value or input file. The message names it."""
