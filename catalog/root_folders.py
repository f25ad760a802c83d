"""The files a root holds: those under its model folders, whichever root recorded them first.

An entry names one root (the first whose scan found it), but a root inside another root, or one
whose extra_model_paths.yaml names another root's folders, holds the same files. Asking by
folder, not by the entry's root, gives each root all of its files: `scan ROOT --hash` hashes
them, `roots` counts them, `remove-root` knows which ones no other root holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from catalog.layouts import detect_layout
from catalog.store import Store
from mergekit_sd.errors import UserError


def folders_of(root: str | os.PathLike) -> list[str]:
    """The real paths of a root's model folders; the root itself when it is not there (an
    unplugged drive: its entries are still under it)."""
    try:
        folders = [folder.path for folder in detect_layout(Path(root), problems=[]).folders]
    except UserError:
        folders = [Path(root)]
    # files are recorded by their real paths (a linked models/Lora, a root added by a link)
    return list(dict.fromkeys(os.path.realpath(folder) for folder in folders))


def under(folders: list[str], column: str = "path") -> tuple[str, list[str]]:
    """An SQL condition on `column` for the paths inside `folders`, and its arguments.
    A range, not LIKE: names may hold % and _, and the range uses the path index."""
    if not folders:
        return "0", []
    args = []
    for folder in folders:
        # every path below FOLDER/ sorts before FOLDER0 ('0' follows '/')
        prefix = folder.rstrip(os.sep) + os.sep
        args.extend([prefix, prefix[:-1] + chr(ord(os.sep) + 1)])
    return ("(" + " OR ".join(f"({column} >= ? AND {column} < ?)" for _ in folders) + ")",
            args)


def root_folders(store: Store, root_ids: list[int] | None = None) -> dict[int, list[str]]:
    """root id -> its model folders, for the given roots (all by default)."""
    rows = store.db.execute("SELECT id, path FROM roots ORDER BY id").fetchall()
    return {row["id"]: folders_of(row["path"]) for row in rows
            if root_ids is None or row["id"] in root_ids}


def held_by(store: Store, root_ids: list[int]) -> tuple[str, list]:
    """An SQL condition on `files` for the entries these roots hold: under their folders, or
    recorded by them (a file the layout no longer names), and its arguments."""
    folders = [f for fs in root_folders(store, root_ids).values() for f in fs]
    condition, args = under(folders)
    marks = ",".join("?" * len(root_ids)) or "NULL"
    return f"(root_id IN ({marks}) OR {condition})", [*root_ids, *args]


def file_counts(store: Store) -> dict[int, int]:
    """root id -> how many entries (present or missing) it holds."""
    counts = {}
    for root_id in root_folders(store):
        condition, args = held_by(store, [root_id])
        counts[root_id] = store.db.execute(f"SELECT count(*) FROM files WHERE {condition}",
                                           args).fetchone()[0]
    return counts
