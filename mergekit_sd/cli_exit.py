"""Ending the `mergekit-sd` process once a command is done.

Why not a plain `sys.exit`: once torch is loaded, the interpreter's teardown (clearing a
thousand modules, then libtorch's static destructors unregistering its operators) comes after
every byte of the command's work is on disk, and is a visible share of a few-second command
(bench/bake_parts.py: the SDXL bake with the normal exit took 1.03x and 1.08x as long in two
runs). When torch was imported and nothing is left running, the process instead runs what
teardown must run (the `atexit` handlers: logging's flush, sqlite3 and temporary-file cleanups
registered that way), flushes its output and leaves with `os._exit`. Our outputs never depend
on teardown: every file is written, fsynced and renamed, and every catalog transaction
committed, before a command returns.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def _others_running() -> bool:
    """Whether a thread other than this one would keep a normal exit waiting (non-daemon, such
    as an executor's worker): then the normal exit, which waits for it, is the right one."""
    me = threading.current_thread()
    return any(t is not me and t.is_alive() and not t.daemon for t in threading.enumerate())


def exit_process(code: int) -> NoReturn:
    """Leave with `code`: quickly when torch is loaded (see the module's docstring)."""
    if "torch" not in sys.modules or threading.current_thread() is not threading.main_thread() \
            or _others_running():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe: nothing more can reach its reader
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
