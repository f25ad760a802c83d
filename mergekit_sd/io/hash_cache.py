"""Remembered SHA256s of files on disk, so a 7 GB base is hashed once, not at every bake, merge
or render that records it.

An entry holds for the same file only while it is unchanged: it is keyed by the resolved path
and checked against the device, inode, size, and modification and change times (the change
time cannot be set back by any tool, so a file rewritten in place never matches). A hash is
stored only when the file did not change while it was being read, and not for a file changed in
the last few seconds: file times tick coarsely, so a rewrite that soon could keep every stamp
(git's "racy clean" problem). The cache lives in an SQLite
file in the user cache folder; when that cannot be read or written, hashes are simply computed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from mergekit_sd.io.user_cache import cache_dir

SETTLED_NS = 3_000_000_000  # a file changed more recently than this is not remembered
_SCHEMA = """CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER,
size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT NOT NULL)"""


def identity(path: str | os.PathLike) -> tuple[str, tuple[int, ...]]:
    """(resolved path, what must not change) for `path` now."""
    st = os.stat(path)
    return str(Path(path).resolve()), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                       st.st_ctime_ns)


def _connect() -> sqlite3.Connection:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(folder / "hashes.sqlite", timeout=2)
    db.execute(_SCHEMA)
    return db


def known_sha256(path: str | os.PathLike) -> str | None:
    """The remembered SHA256 of `path` when the file is unchanged since, else None."""
    try:
        name, stamp = identity(path)
        with _connect() as db:
            row = db.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, sha256 FROM hashes "
                             "WHERE path = ?", (name,)).fetchone()
        db.close()
    except (OSError, sqlite3.Error):
        return None
    return row[5] if row and tuple(row[:5]) == stamp else None


def remember_sha256(path: str | os.PathLike, sha256: str,
                    before: tuple[str, tuple[int, ...]]) -> None:
    """Record `sha256` for `path` if it still is the file `before` (its `identity` taken
    before reading) described."""
    try:
        name, stamp = identity(path)
        if (name, stamp) != before or time.time_ns() - max(stamp[3:]) < SETTLED_NS:
            return
        with _connect() as db:
            db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, *stamp, sha256))
        db.close()
    except (OSError, sqlite3.Error):
        pass
