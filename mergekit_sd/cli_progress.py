"""Rich progress bars for the CLI, fed by the engine's (stage, done, total) callback."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def rich_progress():
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description:>10}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), transient=False) as progress:

        def report(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total or 1)
            progress.update(bars[stage], completed=done, total=total or 1)

        yield report
