"""A file that left one path and is present under another (found by its SHA256): its entry's
user data (tags, notes, rating, favourite, source) follows it, and the stale entry goes. So does
the record of the preview saved beside it: where the preview moved with it, `identify --refresh`
still knows it (by its name and bytes, which it checks) for the one it saved.

Only a copy that is new is the file moved: one that appeared after the vanished file was last
seen present (its root's previous scan). An identical copy that was there all along is another
file (a backup, a second copy); the vanished entry then stays, missing, with its data, and comes
back as it was when its file does. An entry under a root whose folder is not there (an unplugged
drive) is never taken for moved.
"""

from __future__ import annotations

import os
import sqlite3

from catalog.sidecars import PREVIEW_RECORD


def adopt(db: sqlite3.Connection, old_id: int, new_id: int) -> None:
    """Carry the user data of entry `old_id` over to `new_id`, then delete `old_id`: tags of
    both, both notes, the rating that is set, the preview record where `new_id` has none. Runs
    inside the caller's write transaction."""
    old = db.execute("SELECT notes, rating, favourite, source, source_ids, first_seen, "
                     "json_type(details, :at) = 'object' AS has_record FROM files WHERE id = :id",
                     {"at": PREVIEW_RECORD, "id": old_id}).fetchone()
    db.execute("INSERT OR IGNORE INTO tags (file_id, tag) SELECT ?, tag FROM tags WHERE "
               "file_id = ?", (new_id, old_id))
    db.execute("""UPDATE files SET
                      notes = CASE WHEN :notes = '' OR :notes = notes THEN notes
                                   WHEN notes = '' THEN :notes
                                   ELSE :notes || char(10) || notes END,
                      rating = CASE WHEN rating = 0 THEN :rating ELSE rating END,
                      favourite = MAX(favourite, :favourite),
                      source = CASE WHEN source = 'local' THEN :source ELSE source END,
                      source_ids = json_patch(:source_ids, source_ids),
                      first_seen = MIN(first_seen, :first_seen)
                  WHERE id = :id""", {**dict(old), "id": new_id})
    if old["has_record"]:  # json(): set as the object it is, not as a string of its text
        db.execute("UPDATE files SET details = json_set(details, :at, json((SELECT "
                   "json_extract(details, :at) FROM files WHERE id = :old))) "
                   "WHERE id = :new AND json_type(details, :at) IS NULL",
                   {"at": PREVIEW_RECORD, "old": old_id, "new": new_id})
    db.execute("DELETE FROM files WHERE id = ?", (old_id,))


def missing_twin(db: sqlite3.Connection, file_id: int, sha256: str) -> sqlite3.Row | None:
    """A missing entry with this SHA256 that the file `file_id` is, moved: it vanished from a
    root that is there, and `file_id` was first seen after it was last seen present."""
    rows = db.execute(
        "SELECT f.id, f.path, r.path AS root FROM files f JOIN roots r ON r.id = f.root_id "
        "WHERE f.sha256 = ? AND f.status = 'missing' AND f.id != ? AND f.missing_since < "
        "(SELECT first_seen FROM files WHERE id = ?) ORDER BY f.id", (sha256, file_id, file_id))
    return next((row for row in rows if os.path.isdir(row["root"])), None)


def present_twin(db: sqlite3.Connection, file_id: int, sha256: str,
                 last_seen_present: float) -> sqlite3.Row | None:
    """A present, hashed entry with this SHA256 first seen after `last_seen_present` (when
    the vanished file `file_id` was last seen): where it went."""
    return db.execute("SELECT id, path FROM files WHERE sha256 = ? AND status != 'missing' AND "
                      "id != ? AND first_seen > ? ORDER BY id LIMIT 1",
                      (sha256, file_id, last_seen_present)).fetchone()
