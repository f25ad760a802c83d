"""Hashes kept in the catalog, valid while the file's device, inode, size and mtime are unchanged.

Hashing a library reads every byte, so it is never repeated for a file that has not changed,
runs across several files at once (or one at a time for a spinning disk, where parallel reads
seek), and each file's hashes land in their own transaction: an interrupted run keeps the files
it finished. A new file whose SHA256 equals a missing entry's, first seen after that entry's
file was last seen, is that entry moved (to another disk, where the inode changes): it takes
over the entry's tags, notes, rating and source.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from catalog.hashes import FileHashes, hash_file, hash_key
from catalog.moves import adopt, missing_twin
from catalog.root_folders import held_by
from catalog.scan import recheck_sidecars
from catalog.store import Store
from mergekit_sd.errors import Cancelled
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress


@dataclass
class HashReport:
    hashed: int = 0
    bytes: int = 0
    cached: int = 0
    moved: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cached_hashes(store: Store, path: Path) -> FileHashes | None:
    """The catalog's hashes of `path` if it knows them for the file as it is now."""
    try:
        key = hash_key(path.stat())
    except OSError:
        return None
    row = store.db.execute("SELECT sha256, crc32, autov1, autov3 FROM files WHERE path = ? AND "
                           "hash_key = ?", (str(path), key)).fetchone()
    return FileHashes(row["sha256"], row["crc32"], row["autov1"], row["autov3"]) if row else None


def _save(store: Store, file_id: int, key: str, hashes: FileHashes) -> None:
    with store.write() as db:
        db.execute("UPDATE files SET sha256 = ?, crc32 = ?, autov1 = ?, autov3 = ?, "
                   "hash_key = ?, updated_at = ? WHERE id = ?",
                   (hashes.sha256, hashes.crc32, hashes.autov1, hashes.autov3, key, time.time(),
                    file_id))


def hash_now(store: Store, file_id: int, path: Path, progress: ProgressCallback = no_progress,
             cancel: CancelToken | None = None) -> FileHashes:
    """Hash one entry's file now and keep its hashes, as hash_pending does (OSError where it
    cannot be read)."""
    st = path.stat()
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress(f"hashing {path.name}", done, st.st_size)

    hashes = hash_file(path, on_bytes, lambda: cancel is not None and cancel.cancelled)
    _save(store, file_id, hash_key(st), hashes)
    recheck_sidecars(store, file_id, path)
    return hashes


def hash_pending(store: Store, root_ids: list[int] | None = None, jobs: int = 2,
                 progress: ProgressCallback = no_progress, cancel: CancelToken | None = None
                 ) -> HashReport:
    """Hash every present file (of the given roots) whose cached hashes are stale or absent."""
    started = time.perf_counter()
    report = HashReport()
    sql, args = ("SELECT id, path, size, hash_key FROM files "
                 "WHERE status NOT IN ('missing', 'unreadable')"), []
    if root_ids is not None:
        # the files under the roots' folders, also those a root around them recorded first
        condition, args = held_by(store, root_ids)
        sql += f" AND {condition}"
    rows = store.db.execute(sql, args).fetchall()
    todo = []
    for row in rows:
        try:
            key = hash_key(os.stat(row["path"]))
        except OSError as exc:
            report.problems.append(f"{row['path']}: cannot read it ({exc.strerror}); not hashed")
            continue
        if key == row["hash_key"]:
            report.cached += 1
        else:
            todo.append((row["id"], Path(row["path"]), key))
    total = sum(int(key.rsplit(":", 2)[1]) for _, _, key in todo)
    done = 0
    lock = threading.Lock()
    progress("hashing", 0, total)

    def on_bytes(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            progress("hashing", done, total)

    def cancelled() -> bool:
        return cancel is not None and cancel.cancelled

    def work(item):
        file_id, path, key = item
        if cancelled():
            return None
        try:
            hashes = hash_file(path, on_bytes, cancelled)
        except OSError as exc:
            return file_id, path, None, f"{path}: cannot read it ({exc.strerror}); not hashed"
        return file_id, path, (key, hashes), None

    # each file already hashes on two threads; more files at once keep the disk busy
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for result in pool.map(work, todo):
            if result is None:
                continue
            file_id, path, found, problem = result
            if problem:
                report.problems.append(problem)
                continue
            key, hashes = found
            _save(store, file_id, key, hashes)
            # a `.civitai.info` trusted until now may describe the file that had this name
            report.problems.extend(recheck_sidecars(store, file_id, path))
            report.hashed += 1
            report.bytes += int(key.rsplit(":", 2)[1])
            if (old := _adopt_missing_twin(store, file_id, hashes.sha256)) is not None:
                report.moved.append((old, str(path)))
    if cancelled():
        raise Cancelled("hashing cancelled; the files finished so far keep their hashes")
    report.seconds = time.perf_counter() - started
    return report


def _adopt_missing_twin(store: Store, file_id: int, sha256: str) -> str | None:
    """If a missing entry has this SHA256 and this file appeared after it was last seen (and
    not while its drive is unplugged: see catalog/moves.py), the file moved: the entries' user
    data is joined here and the missing entry goes. Returns the old path."""
    with store.write() as db:
        twin = missing_twin(db, file_id, sha256)
        if twin is None:
            return None
        adopt(db, twin["id"], file_id)
        return twin["path"]

