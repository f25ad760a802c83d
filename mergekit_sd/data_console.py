"""The rich console that commands print data to: file paths, refs, names from servers.

rich lays output out for 80 columns when stdout is not a terminal (or for the width of a
terminal on stdin), so `mergekit-sd search ... | grep hf://` or `catalog scan > log` got refs
and paths cut in two. Written to a pipe or a file, lines here are never wrapped; in a terminal,
tables fit its width.
"""

from __future__ import annotations

import os

from rich.console import Console

# wide enough for any line: tables take the width they need, not this (they do not expand)
UNLIMITED = 1_000_000


def data_console(soft_wrap: bool = False) -> Console:
    """Markup, highlighting and emoji codes off: file names and metadata are data, printed
    exactly as they are. Not a terminal: no width limit, unless $COLUMNS sets one (bash does
    not export it: a COLUMNS that reaches us was set on purpose). `soft_wrap`: lines of text
    are never broken, in a terminal either (it wraps them for the eye, and a path copied out
    of one is whole); for messages, not for tables and trees, which would be cut instead."""
    options = {"markup": False, "highlight": False, "emoji": False, "soft_wrap": soft_wrap}
    console = Console(**options)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(**options, width=UNLIMITED)
    return console


def rule_width(console: Console, title: str) -> int:
    """How wide to draw a rule (a line across the output) titled `title` on `console`: the
    console's width in a terminal or under COLUMNS. With no limit (a pipe, a file) a rule
    would fill a million columns, for it takes the whole width whatever its title: 80
    columns then, or as many as the title needs to stay whole."""
    if console.width < UNLIMITED:
        return console.width
    return max(80, len(title) + 8)
