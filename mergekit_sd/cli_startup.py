"""Importing torch for a one-shot command, with the cyclic garbage collector paused.

`import torch` creates a few hundred thousand objects, so the collector runs dozens of times
during it, each time walking what is already there: about a tenth of the import (0.71 s
against 0.79 s on our 2-core machine). A bake imports torch before it can compute anything,
so that tenth is on its critical path. Afterwards the objects torch made are frozen
(`gc.freeze`): they live as long as the process anyway, and later collections need not walk
them either.
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
