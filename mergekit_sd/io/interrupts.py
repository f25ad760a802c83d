"""Clean-up that a second Ctrl-C must not cut short.

The first Ctrl-C raises KeyboardInterrupt, and the clean-up on the way out runs: stopping a
copy thread, closing the output, deleting NAME.partial. An impatient second Ctrl-C would raise
again in the middle of it and leave the partial file behind. While `interrupts_held()` is
entered on the main thread (the only one Python interrupts), SIGINT is only noted; when the
block ends, a noted interrupt goes to the handler that was there before (by default: raise
KeyboardInterrupt), unless the block is already leaving with an exception of its own.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(frame))
    leaving_with_error = False
    try:
        yield
    except BaseException:
        leaving_with_error = True
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        if noted and not leaving_with_error and callable(previous):
            previous(signal.SIGINT, noted[-1])
