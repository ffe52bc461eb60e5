"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class WorkbenchError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
