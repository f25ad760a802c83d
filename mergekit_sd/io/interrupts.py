"""Ctrl-C, SIGTERM and SIGHUP: one way out, and clean-up that a second signal cannot cut short.

The first Ctrl-C raises KeyboardInterrupt, and the clean-up on the way out runs: stopping a
copy thread, closing the output, deleting NAME.partial. A closed terminal (SIGHUP), `kill` or
`timeout` (SIGTERM) would by default end the process on the spot and leave the partial files
behind, so while `stop_signals_raise()` is entered (the CLI, for the whole command) they raise
`Stopped`, a KeyboardInterrupt, and take the same way out.

An impatient second signal would raise again in the middle of the clean-up and leave the
partial file behind. While `interrupts_held()` is entered on the main thread (the only one
Python interrupts), these signals are only noted; when the block ends, the first one noted
goes to the handler that was there before (by default: raise KeyboardInterrupt), unless the
block is already leaving with an exception of its own.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C is so that the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stopped_by: list[int] = []  # the signals that raised Stopped, for the exit code


def stopped_by() -> int:
    """The signal that stopped the command: SIGTERM or SIGHUP once one raised `Stopped`, else
    SIGINT (typer turns any KeyboardInterrupt into a bare exit code, so it is kept here)."""
    return _stopped_by[0] if _stopped_by else signal.SIGINT


def _raise_stopped(signum, frame) -> None:
    _stopped_by.append(signum)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` inside the block. One the process inherited as
    ignored (`nohup` ignores SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stopped_by.clear()
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Note the stop signals that Python handles (SIGINT, and SIGTERM/SIGHUP within
    `stop_signals_raise`) until the block is done; see the module's docstring."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list = []
    previous = {}
    for signum in STOP_SIGNALS:
        # a signal left to the system (SIG_DFL) or ignored is not ours to hold or deliver
        if callable(signal.getsignal(signum)):
            previous[signum] = signal.signal(
                signum, lambda signum, frame: noted.append((signum, frame)))
    leaving_with_error = False
    try:
        yield
    except BaseException:
        leaving_with_error = True
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if noted and not leaving_with_error:
            signum, frame = noted[0]
            previous[signum](signum, frame)
