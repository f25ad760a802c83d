"""What a scan's identification worker does first: leave when the scan's process does.

The workers are forked by multiprocessing's fork server and wait on a pipe whose both ends they
hold, so a scan killed with SIGKILL (no clean-up runs) would leave them, the fork server and its
resource tracker waiting for ever, holding the killed command's stdout open: a caller waiting for
its end (a TUI, a shell pipe) would hang. Each worker therefore watches the scan's process and
exits the moment it ends; the fork server and tracker then see their pipes close and exit too.
"""

from __future__ import annotations

import os
import select
import threading
import time


def exit_with(parent_pid: int) -> None:
    """ProcessPoolExecutor initializer: exit when `parent_pid` (the scan's process) does, and
    let go of its stdout and stderr (results travel by the pool's pipes)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    threading.Thread(target=_wait_for_exit, args=(parent_pid,), name="exit-with-parent",
                     daemon=True).start()


def _wait_for_exit(pid: int) -> None:
    try:
        # a pidfd names this very process (no pid reuse) and becomes readable when it ends;
        # the parent is alive here: it is waiting for this worker to start
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # not Linux 5.3 or later: look every second
        while _alive(pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([fd], [], [])
    os._exit(0)  # no clean-up to run: the work in hand belongs to a scan that is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
