"""torch's intra-op thread count set for a while and put back afterwards.

Why: torch's thread count is a process-wide setting, and the passes that change it (a bake's
crew of workers, a render of a tiny model) must leave a long-running process (the TUI, a
recipe's later steps) with the count it had.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def torch_threads(count: int):
    """torch computing on `count` threads inside the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
