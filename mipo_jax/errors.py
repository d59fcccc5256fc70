"""Errors a user can fix: the command prints their message (no traceback) and exits 2."""


class UserError(ValueError):
    """A mistake in the config, the data or the workdir, with what to do about it."""
