"""Importing torch for a one-shot command, with the cyclic garbage collector paused.

`import torch` creates a few hundred thousand objects, so the collector runs dozens of times
during it, each time walking what is already there: about a tenth of the import
(`bench/torch_import.py`: 0.89x and 0.91x the time of a plain import in two runs). A bake
imports torch before it can compute anything, so that tenth is on its critical path.
Afterwards the objects torch made are frozen (`gc.freeze`): they live as long as the process
anyway, and later collections need not walk them either.

Every command that needs torch imports it here first, with Ctrl-C (and SIGTERM/SIGHUP) held
until the import is done: a KeyboardInterrupt raised inside torch's C++ start-up is swallowed
by it (the command then runs to the end and exits 0), leaves numpy half-imported ("cannot load
module more than once per process"), or aborts the process. Held, the signal raises right
after the import, and the command ends as any interrupted one does.
"""

from __future__ import annotations

import gc
import sys
from types import ModuleType

from mergekit_sd.io.interrupts import interrupts_held


def import_torch() -> ModuleType:
    """torch, imported now (with the collector paused, its objects frozen, and a Ctrl-C
    raised only once it is done) unless it already was."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    with interrupts_held():
        enabled = gc.isenabled()
        gc.disable()
        try:
            import torch
        finally:
            if enabled:
                gc.enable()
        gc.freeze()
    return torch
