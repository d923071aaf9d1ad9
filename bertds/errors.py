"""Errors caused by the user's input (bad flags, data, configs): the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2
