"""Progress reporting and cancellation for long work, injected by the caller (CLI, TUI, tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from mergekit_sd.errors import Cancelled

# stage ("hashing", "merging" ...), done, total (same unit within a stage)
ProgressCallback = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default: report nothing."""


class CancelToken:
    """Set from any thread (a TUI button, a signal handler); long work checks it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled; nothing was written under the output name")
