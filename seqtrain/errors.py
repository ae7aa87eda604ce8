"""The one exception type a user sees: a mistake they can fix, reported in one line with exit status 2."""


class UserError(Exception):
    """A problem with the user's input or run directory; the message names the problem and the fix."""

    exit_code = 2
