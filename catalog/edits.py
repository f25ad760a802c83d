"""Changes users make to the catalog: roots, tags, notes, ratings, removal.

Model files are referenced in place; only `remove(..., delete_file=True)` touches one, and the
CLI asks before it does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from catalog.entries import Entry
from catalog.layouts import RootLayout, detect_layout
from catalog.root_folders import held_by, root_folders
from catalog.store import Store
from catalog.walk import is_utf8, shown
from mergekit_sd.errors import UserError

MAX_RATING = 5


def add_root(store: Store, path: Path) -> tuple[int, RootLayout]:
    """Register a folder to scan, by its real path (a folder added through a link and directly
    is one root); adding it again just reports its layout."""
    root = Path(os.path.realpath(path.expanduser()))
    if not is_utf8(str(root)):
        raise UserError(f"{shown(root)}: its name is not valid UTF-8; rename the folder to add "
                        "it")
    layout = detect_layout(root)
    with store.write() as db:
        # a root added through a link before roots were stored by their real path
        same = _root_at(db, root)
        if same is not None:
            db.execute("UPDATE roots SET path = ?, layout = ? WHERE id = ?",
                       (str(root), layout.name, same))
            return same, layout
        db.execute("INSERT INTO roots (path, layout, added_at) VALUES (?, ?, ?)",
                   (str(root), layout.name, time.time()))
        root_id = db.execute("SELECT id FROM roots WHERE path = ?", (str(root),)).fetchone()[0]
    return root_id, layout


def _root_at(db, real: Path) -> int | None:
    """The root whose folder is `real` (a real path), however its path was stored."""
    for row in db.execute("SELECT id, path FROM roots ORDER BY id"):
        if row["path"] == str(real) or os.path.realpath(row["path"]) == str(real):
            return row["id"]
    return None


def enclosing_root(store: Store, root_id: int) -> tuple[int, str, list[str]] | None:
    """Another root that the folder of root `root_id` lies inside and whose scans find some of
    its files too, as (id, path, the folders both roots scan). A web UI root scans only its
    model folders: a root beside them (its `merges`) shares no file with it."""
    path = store.db.execute("SELECT path FROM roots WHERE id = ?", (root_id,)).fetchone()[0]
    inner = root_folders(store, [root_id])[root_id]
    for row in store.db.execute("SELECT id, path FROM roots WHERE id != ? ORDER BY id",
                                (root_id,)):
        if Path(path).is_relative_to(os.path.realpath(row["path"])):
            outer = root_folders(store, [row["id"]])[row["id"]]
            # the deeper folder of each pair where one lies inside the other
            shared = [a for a in inner if any(Path(a).is_relative_to(b) for b in outer)]
            shared += [b for b in outer if any(Path(b).is_relative_to(a) for a in inner)]
            if shared:
                return row["id"], row["path"], list(dict.fromkeys(shared))
    return None


ADD_IT_FIRST = "add it first with `mergekit-sd catalog add-root`"
ROOTS_LISTS_THEM = "`mergekit-sd catalog roots` lists them"


def root_ids_for(store: Store, paths: list[Path], advice: str = ADD_IT_FIRST) -> list[int]:
    """The ids of registered roots, named by path (through a link too); UserError for one that
    is not a root, with `advice` (to scan a folder, add it; to remove one, find the roots)."""
    ids = []
    for path in paths:
        root = Path(os.path.abspath(path.expanduser()))
        found = _root_at(store.db, Path(os.path.realpath(root)))
        if found is None:
            raise UserError(f"{root}: not a catalog root; {advice}")
        ids.append(found)
    return ids


def _touch(db, entry: Entry) -> None:
    db.execute("UPDATE files SET updated_at = ? WHERE id = ?", (time.time(), entry.id))


def set_tags(store: Store, entry: Entry, add: list[str], remove: list[str]) -> list[str]:
    """Add and remove tags; the entry's tags afterwards. Tags ignore case, as every filter does:
    "Anime" added to an entry tagged "anime" keeps the spelling it has, and --remove ANIME
    removes it."""
    for tag in (*add, *remove):
        _check_tag(tag)
    with store.write() as db:
        have = {row[0].casefold(): row[0] for row in db.execute(
            "SELECT tag FROM tags WHERE file_id = ?", (entry.id,))}
        for tag in (t.strip() for t in add):
            if tag.casefold() not in have:
                db.execute("INSERT INTO tags (file_id, tag) VALUES (?, ?)", (entry.id, tag))
                have[tag.casefold()] = tag
        gone = {t.strip().casefold() for t in remove}
        db.executemany("DELETE FROM tags WHERE file_id = ? AND tag = ?",
                       [(entry.id, tag) for key, tag in have.items() if key in gone])
        _touch(db, entry)
        return [r[0] for r in db.execute("SELECT tag FROM tags WHERE file_id = ? ORDER BY tag",
                                         (entry.id,))]


def _check_tag(tag: str) -> None:
    if not tag.strip():
        raise UserError(f"tag {tag!r}: a tag cannot be empty or only spaces; give a word")


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


@dataclass
class RootRemoval:
    path: str
    forgotten: int  # entries no other root holds
    annotated: int  # of those, entries with tags, notes, a rating or a favourite mark
    kept: int  # entries another root holds too (a root inside it, or around it)


def remove_root(store: Store, root_id: int, dry_run: bool = False) -> RootRemoval:
    """Stop scanning a root and forget the entries of files no other root holds (a root is
    never scanned again, so they could only go stale); entries another root holds pass to it.
    No file is touched. `dry_run`: only say what it would do."""
    others = [r for r in root_folders(store) if r != root_id]
    with store.write() as db:
        path = db.execute("SELECT path FROM roots WHERE id = ?", (root_id,)).fetchone()[0]
        condition, args = held_by(store, [root_id])
        rows = db.execute(f"SELECT id, path, root_id, notes != '' OR rating > 0 OR favourite "
                          "OR EXISTS (SELECT 1 FROM tags WHERE file_id = files.id) AS annotated "
                          f"FROM files WHERE {condition}", args).fetchall()
        keep: dict[int, int] = {}  # entry -> the root it passes to
        for other in others:
            inside, inside_args = held_by(store, [other])
            for row in db.execute(f"SELECT id FROM files WHERE {inside} AND id IN "
                                  f"(SELECT id FROM files WHERE {condition})",
                                  [*inside_args, *args]):
                keep.setdefault(row[0], other)
        forget = [row for row in rows if row["id"] not in keep]
        report = RootRemoval(path, len(forget), sum(bool(r["annotated"]) for r in forget),
                             len(keep))
        if dry_run:
            return report
        db.executemany("UPDATE files SET root_id = ? WHERE id = ? AND root_id IS ?",
                       [(other, file_id, root_id) for file_id, other in keep.items()])
        db.executemany("DELETE FROM files WHERE id = ?", [(row["id"],) for row in forget])
        db.execute("DELETE FROM roots WHERE id = ?", (root_id,))
    return report
