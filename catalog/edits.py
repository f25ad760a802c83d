"""Changes users make to the catalog: roots, tags, notes, ratings, removal.

Model files are referenced in place; only `remove(..., delete_file=True)` touches one, and the
CLI asks before it does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from catalog.entries import Entry
from catalog.layouts import RootLayout, detect_layout
from catalog.store import Store
from catalog.walk import is_utf8, shown
from mergekit_sd.errors import UserError

MAX_RATING = 5


def add_root(store: Store, path: Path) -> tuple[int, RootLayout]:
    """Register a folder to scan; adding it again just reports its layout."""
    root = Path(os.path.abspath(path.expanduser()))
    if not is_utf8(str(root)):
        raise UserError(f"{shown(root)}: its name is not valid UTF-8; rename the folder to add "
                        "it")
    layout = detect_layout(root)
    with store.write() as db:
        db.execute("INSERT INTO roots (path, layout, added_at) VALUES (?, ?, ?) "
                   "ON CONFLICT(path) DO UPDATE SET layout = excluded.layout",
                   (str(root), layout.name, time.time()))
        root_id = db.execute("SELECT id FROM roots WHERE path = ?", (str(root),)).fetchone()[0]
    return root_id, layout


def root_ids_for(store: Store, paths: list[Path]) -> list[int]:
    """The ids of registered roots, named by path; UserError for one that is not a root."""
    ids = []
    for path in paths:
        root = str(Path(os.path.abspath(path.expanduser())))
        row = store.db.execute("SELECT id FROM roots WHERE path = ?", (root,)).fetchone()
        if row is None:
            raise UserError(f"{root}: not a catalog root; add it first with "
                            "`mergekit-sd catalog add-root`")
        ids.append(row[0])
    return ids


def _touch(db, entry: Entry) -> None:
    db.execute("UPDATE files SET updated_at = ? WHERE id = ?", (time.time(), entry.id))


def set_tags(store: Store, entry: Entry, add: list[str], remove: list[str]) -> list[str]:
    cleaned = [t.strip() for t in add if t.strip()]
    with store.write() as db:
        db.executemany("INSERT OR IGNORE INTO tags (file_id, tag) VALUES (?, ?)",
                       [(entry.id, tag) for tag in cleaned])
        db.executemany("DELETE FROM tags WHERE file_id = ? AND tag = ?",
                       [(entry.id, tag.strip()) for tag in remove])
        _touch(db, entry)
        return [r[0] for r in db.execute("SELECT tag FROM tags WHERE file_id = ? ORDER BY tag",
                                         (entry.id,))]


def set_note(store: Store, entry: Entry, text: str) -> None:
    with store.write() as db:
        db.execute("UPDATE files SET notes = ? WHERE id = ?", (text.strip(), entry.id))
        _touch(db, entry)


def set_rating(store: Store, entry: Entry, rating: int | None, favourite: bool | None) -> None:
    if rating is not None and not 0 <= rating <= MAX_RATING:
        raise UserError(f"rating {rating}: give 0 (none) to {MAX_RATING} stars")
    with store.write() as db:
        if rating is not None:
            db.execute("UPDATE files SET rating = ? WHERE id = ?", (rating, entry.id))
        if favourite is not None:
            db.execute("UPDATE files SET favourite = ? WHERE id = ?", (int(favourite), entry.id))
        _touch(db, entry)


def remove(store: Store, entry: Entry, delete_file: bool) -> bool:
    """Forget the entry; with `delete_file`, delete the model file first. Returns whether a
    file was deleted. Its sidecars stay (they may belong to other tools' workflows)."""
    deleted = False
    if delete_file and os.path.lexists(entry.path):
        try:
            os.remove(entry.path)
        except OSError as exc:
            raise UserError(f"{entry.path}: cannot delete it ({exc.strerror}); the entry is "
                            "kept") from None
        deleted = True
    with store.write() as db:
        db.execute("DELETE FROM files WHERE id = ?", (entry.id,))
    return deleted
