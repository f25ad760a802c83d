"""Rich progress bars for the CLI, fed by the engine's (stage, done, total) callback.

The bars go to stderr, and only when it is a terminal: stdout carries results (`pull >
pulled.txt`, `merge | grep wrote`, JSON), and a log file or pipe would get every frame as text.
"""

from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def rich_progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    bars: dict[str, int] = {}
    lock = threading.Lock()  # downloads report from several threads
    progress = Progress(TextColumn("{task.description:>10}"), BarColumn(), TaskProgressColumn(),
                        TimeRemainingColumn(), console=console, transient=False)

    def report(stage: str, done: int, total: int) -> None:
        with lock:
            if stage not in bars:
                # drawn from the first report on: a command that fails or has nothing to do
                # before it prints its lines and nothing else
                if not bars:
                    progress.start()
                bars[stage] = progress.add_task(stage, total=total or 1)
        progress.update(bars[stage], completed=done, total=total or 1)

    def silent(stage: str, done: int, total: int) -> None:
        pass

    try:
        yield report if console.is_terminal else silent
    finally:
        if bars:
            progress.stop()
