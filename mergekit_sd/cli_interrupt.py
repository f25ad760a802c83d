"""What the `interrupted:` line says when Ctrl-C stops a command.

A command sets it when it knows better than the default what it keeps and what to do next (a
scan, a pull). A module of its own: under `python -m mergekit_sd.cli`, cli.py runs as
`__main__`, a second copy of it beside the `mergekit_sd.cli` that the commands import.
"""

from __future__ import annotations

# what every command that writes files keeps to: each is renamed into place only when complete
NOTHING_HALF_WRITTEN = "no file was left half-written under its final name"

_note = [NOTHING_HALF_WRITTEN]


def on_interrupt(note: str) -> None:
    """What the `interrupted:` line says if Ctrl-C stops the command now running."""
    _note[0] = note


def interrupt_note() -> str:
    return _note[0]
