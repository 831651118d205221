"""User-facing errors: the CLI prints their one-line message and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown choice, bad value, missing model...)."""
