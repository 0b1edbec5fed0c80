"""The one exception type that reaches the user as a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. The CLI prints it and exits 2."""
