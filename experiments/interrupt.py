"""Ctrl-C that waits for a safe moment: a SIGINT handler that only sets a flag.

Python's default handler raises `KeyboardInterrupt` wherever the main thread happens to
be: inside a host callback that XLA is running, inside the garbage collector's XLA
callback (where it is swallowed), or while compiled work is still running on other
threads (a segmentation fault at exit). Inside `catching()` the first SIGINT only
records the request; the group program asks `requested()` after every record window
(through its `on_window` callback) and stops there, and the runner then raises
`Interrupted` from ordinary Python code. A second SIGINT falls back to the handler that
was there before (to get out of a hung computation).

Example:
  >>> with interrupt.catching():
  ...     for group in groups:
  ...         interrupt.check()          # raises Interrupted if Ctrl-C was pressed
  ...         train(group)
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

import jax

_state = {"depth": 0, "requested": False, "previous": None}


class Interrupted(KeyboardInterrupt):
    """The user interrupted the run; what finished before was kept.

    A `KeyboardInterrupt`, so code that handles Ctrl-C handles this too."""


def _handler(signum, frame) -> None:
    if _state["requested"]:
        previous = _state["previous"]
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt
        return
    _state["requested"] = True


def requested() -> bool:
    """Whether SIGINT arrived inside the current `catching()` block."""
    return _state["requested"]


def check() -> None:
    """Raise `Interrupted` if SIGINT arrived inside the current `catching()` block."""
    if _state["requested"]:
        raise Interrupted("interrupted")


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Defer SIGINT to `requested()` / `check()` inside the block; nested blocks share
    the outermost one's handler. On leaving the outermost block the old handler comes
    back and a pending interrupt is raised as `Interrupted`. Outside the main thread
    (where signal handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state["depth"] == 0
    if outermost:
        _state["requested"] = False
        _state["previous"] = signal.signal(signal.SIGINT, _handler)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if outermost:
            signal.signal(signal.SIGINT, _state["previous"])
            pending, _state["requested"] = _state["requested"], False
    # Reached only when the block ended normally: an exception in flight wins.
    if outermost and pending:
        raise Interrupted("interrupted")


def wait(tree) -> None:
    """`jax.block_until_ready` that keeps the main thread in Python, so a SIGINT handler
    runs while a long program executes (a blocked C++ call would delay it to the end)."""
    leaves = [a for a in jax.tree.leaves(tree) if hasattr(a, "is_ready")]
    pause = 0.001
    while not all(a.is_ready() for a in leaves):
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
