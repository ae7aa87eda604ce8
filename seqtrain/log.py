"""Output for people: one line per event, progress bars on a terminal; only rank 0 speaks."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def is_main_process() -> bool:
    # torchrun sets RANK; a plain run is rank 0.
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def bar(iterable, desc: str, total: int | None = None):
    """A transient tqdm bar on a terminal (disable=None hides it when stderr is not a tty), rank 0 only."""
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=None if is_main_process() else True)


def counter(desc: str, total: int, initial: int = 0):
    """A bar advanced by hand (`.update(1)`), e.g. over epochs when early stopping may end the loop."""
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", leave=False, dynamic_ncols=True,
                disable=None if is_main_process() else True)
