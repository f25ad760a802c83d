"""Importing torch for a one-shot command, with the cyclic garbage collector paused.

`import torch` creates a few hundred thousand objects, so the collector runs dozens of times
during it, each time walking what is already there: about a tenth of the import
(`bench/torch_import.py`: 0.89x and 0.91x the time of a plain import in two runs). A bake
imports torch before it can compute anything, so that tenth is on its critical path.
Afterwards the objects torch made are frozen (`gc.freeze`): they live as long as the process
anyway, and later collections need not walk them either.
"""

from __future__ import annotations

import gc
import sys
from types import ModuleType


def import_torch() -> ModuleType:
    """torch, imported now (with the collector paused and its objects frozen) unless it
    already was."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    return torch
