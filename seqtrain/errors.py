"""The exceptions the command line turns into one line for the user: a mistake they can fix (exit status 2),
or an interrupt whose progress was saved (exit status 130); the argument parser that raises the first; and
how a message names a setting, in the terms of whoever called seqtrain."""

import argparse
from contextlib import contextmanager
from contextvars import ContextVar


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


# --------------------------------------------------------------------------------------------------------
# Messages in the caller's terms (issue 26): a fix is named as the caller would write it, a flag on the
# command line (--download), a keyword argument from Python (download=True).

# A ContextVar rather than a global: train_stages() in one thread does not reword the messages of another.
_FROM_PYTHON: ContextVar[bool] = ContextVar("seqtrain_from_python", default=False)
_NAME_ONLY = object()


@contextmanager
def from_python():
    """While inside (a `with` block, or a function decorated `@from_python()`), messages name settings as
    keyword arguments; outside, as the command line's flags, which is also what the benchmarks' flags are."""
    token = _FROM_PYTHON.set(True)
    try:
        yield
    finally:
        _FROM_PYTHON.reset(token)


def setting(name: str, value=_NAME_ONLY) -> str:
    """A Config field as the caller writes it: `--image-size 16` or `image_size=16`; without a value, the name
    alone (`--data-dir`, `data_dir`); True, the switch turned on (`--download`, `download=True`)."""
    if _FROM_PYTHON.get():
        return name if value is _NAME_ONLY else f"{name}={value!r}"
    cli = "--" + name.replace("_", "-")
    return cli if value is _NAME_ONLY or value is True else f"{cli} {value}"
