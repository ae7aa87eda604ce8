"""The exceptions the command line turns into one line for the user: a mistake they can fix (exit status 2),
or an interrupt whose progress was saved (exit status 130)."""


class UserError(Exception):
    """A problem with the user's input or run directory; the message names the problem and the fix."""

    exit_code = 2


class Interrupted(Exception):
    """Ctrl-C: the current step finished and a checkpoint was written; rerunning resumes."""

    exit_code = 130
