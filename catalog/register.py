"""Put a file that just arrived into the catalog: under its root, with its hashes and its source.

The download already read every byte to verify it, so the hashes it computed are stored as the
catalog's (valid for the file as it is now: device, inode, size, mtime) and nothing is read
again. The source ids (Civitai model/version/file, Hugging Face repo/path/revision) are what
`civitai://` and `hf://` references in recipes are resolved by.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from catalog.edits import add_root
from catalog.hash_cache import hash_key
from catalog.hashes import FileHashes
from catalog.scan import recheck_sidecars, scan_file
from catalog.sidecars import PREVIEW_RECORD
from catalog.store import Store


def root_containing(store: Store, path: Path) -> int | None:
    """The id of the deepest registered root that holds `path`."""
    best: tuple[int, int] | None = None
    for row in store.db.execute("SELECT id, path FROM roots"):
        root = Path(os.path.realpath(row["path"]))
        if path.is_relative_to(root) and (best is None or len(root.parts) > best[1]):
            best = (row["id"], len(root.parts))
    return best[0] if best else None


def register_download(store: Store, path: Path, hashes: FileHashes, root: Path, source: str,
                      source_ids: dict) -> int:
    """Catalog `path` (adding `root` as a root when no root holds it yet); returns the entry
    id."""
    path = Path(os.path.realpath(path))  # as a scan records it
    root_id = root_containing(store, path)
    if root_id is None:
        root_id, _ = add_root(store, root)
    file_id = scan_file(store, root_id, path)
    key = hash_key(path.stat())
    with store.write() as db:
        db.execute("UPDATE files SET sha256 = ?, crc32 = ?, autov1 = ?, autov3 = ?, hash_key = ?, "
                   "source = ?, source_ids = json_patch(source_ids, ?), updated_at = ? "
                   "WHERE id = ?", (hashes.sha256, hashes.crc32, hashes.autov1, hashes.autov3,
                                    key, source, json.dumps(source_ids), time.time(), file_id))
    # a sidecar left beside the name by an earlier file (Stability Matrix's) was read before
    # the hashes were known
    recheck_sidecars(store, file_id, path)
    return file_id


def record_source(store: Store, file_id: int, source: str, source_ids: dict) -> None:
    """Note where an entry's file can be had (it was already owned when a pull asked for it)."""
    with store.write() as db:
        db.execute("UPDATE files SET source = CASE WHEN source = 'local' THEN ? ELSE source END, "
                   "source_ids = json_patch(source_ids, ?), updated_at = ? WHERE id = ?",
                   (source, json.dumps(source_ids), time.time(), file_id))


def saved_preview(store: Store, file_id: int) -> dict | None:
    """The record of the preview saved beside the entry's file, if one was."""
    row = store.db.execute("SELECT json_extract(details, ?) FROM files WHERE id = ?",
                           (PREVIEW_RECORD, file_id)).fetchone()
    try:
        record = json.loads(row[0]) if row and isinstance(row[0], str) else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def remember_preview(store: Store, file_id: int, record: dict | None) -> None:
    """Keep the record of the preview saved beside the entry's file; None forgets it."""
    with store.write() as db:
        if record is None:
            db.execute("UPDATE files SET details = json_remove(details, ?) WHERE id = ?",
                       (PREVIEW_RECORD, file_id))
        else:
            db.execute("UPDATE files SET details = json_set(details, ?, json(?)) WHERE id = ?",
                       (PREVIEW_RECORD, json.dumps(record), file_id))
