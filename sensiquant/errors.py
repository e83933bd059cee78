"""User-facing errors: the CLI prints these as one line instead of a traceback."""


class SensiquantError(Exception):
    """Bad input or a missing resource that the user can fix."""
