"""The exceptions the command line turns into one line for the user: a mistake they can fix (exit status 2),
or an interrupt whose progress was saved (exit status 130); and the argument parser that raises the first."""

import argparse


class UserError(Exception):
    """A problem with the user's input or run directory; the message names the problem and the fix."""

    exit_code = 2


class Interrupted(Exception):
    """Ctrl-C: the current step finished and a checkpoint was written; rerunning resumes."""

    exit_code = 130


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, exit status 2, for seqtrain.run and seqtrain.probe."""

    def error(self, message: str):
        # One line, no usage block: the message names the flag, --help has the rest.
        raise UserError(f"{message} (see --help)")
