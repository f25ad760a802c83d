"""A file that left one path and is present under another (found by its SHA256): its entry's
user data (tags, notes, rating, favourite, source) follows it, and the stale entry goes."""

from __future__ import annotations

import sqlite3


def adopt(db: sqlite3.Connection, old_id: int, new_id: int) -> None:
    """Carry the user data of entry `old_id` over to `new_id`, then delete `old_id`. Runs
    inside the caller's write transaction."""
    old = db.execute("SELECT notes, rating, favourite, source, source_ids, first_seen FROM files "
                     "WHERE id = ?", (old_id,)).fetchone()
    db.execute("INSERT OR IGNORE INTO tags (file_id, tag) SELECT ?, tag FROM tags WHERE "
               "file_id = ?", (new_id, old_id))
    db.execute("""UPDATE files SET
                      notes = CASE WHEN notes = '' THEN ? ELSE notes END,
                      rating = MAX(rating, ?), favourite = MAX(favourite, ?),
                      source = CASE WHEN source = 'local' THEN ? ELSE source END,
                      source_ids = json_patch(?, source_ids),
                      first_seen = MIN(first_seen, ?)
                  WHERE id = ?""",
               (old["notes"], old["rating"], old["favourite"], old["source"], old["source_ids"],
                old["first_seen"], new_id))
    db.execute("DELETE FROM files WHERE id = ?", (old_id,))


def missing_twin(db: sqlite3.Connection, file_id: int, sha256: str) -> sqlite3.Row | None:
    """A missing entry with this SHA256: the file `file_id` is it, moved."""
    return db.execute("SELECT id, path FROM files WHERE sha256 = ? AND status = 'missing' AND "
                      "id != ? ORDER BY id LIMIT 1", (sha256, file_id)).fetchone()


def present_twin(db: sqlite3.Connection, file_id: int, sha256: str) -> sqlite3.Row | None:
    """A present, hashed entry with this SHA256: where the vanished file `file_id` went."""
    return db.execute("SELECT id, path FROM files WHERE sha256 = ? AND status != 'missing' AND "
                      "id != ? ORDER BY id LIMIT 1", (sha256, file_id)).fetchone()
