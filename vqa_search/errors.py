"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input or environment (bad path, missing index, offline weights)."""
