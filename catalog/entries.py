"""Catalog entries: reading them back, finding one by the references users type, listing.

A reference is an entry id (`12` or `#12`), `catalog:NAME` or a bare name (the file's stem),
`sha256:HEX` (10 or more digits: AutoV2 is the first 10), `autov3:HEX`, or a path.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from catalog.store import Store
from mergekit_sd.errors import UserError

SORTS = {"name": "name COLLATE NOCASE", "size": "size DESC", "date": "first_seen DESC",
         "rating": "rating DESC, favourite DESC", "kind": "kind, name COLLATE NOCASE",
         "arch": "architecture, name COLLATE NOCASE", "path": "path"}
_MAX_ID = 2**63 - 1  # SQLite's largest integer
# what identification calls a file, and what a scan says of one
KINDS = ("checkpoint", "diffusion_model", "lora", "vae", "text_encoder", "embedding", "unknown")
STATUSES = ("ok", "missing", "truncated", "invalid", "unreadable", "unchecked")


@dataclass
class Entry:
    id: int
    path: str
    name: str
    status: str
    problem: str | None
    kind: str | None
    architecture: str | None
    base_model: str | None
    label: str | None
    layout: str | None
    dtype: str | None
    size: int
    parameters: int | None
    lora_format: str | None
    lora_rank: int | None
    folder_kind: str | None
    sha256: str | None
    autov1: str | None
    autov3: str | None
    crc32: str | None
    trigger_words: list[str]
    source: str
    source_ids: dict
    preview: str | None
    notes: str
    rating: int
    favourite: bool
    first_seen: float
    last_seen: float
    details: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["autov2"] = self.autov2
        doc["autov3_short"] = self.autov3[:12] if self.autov3 else None
        return doc


_COLUMNS = ("id, path, name, status, problem, kind, architecture, base_model, label, layout, "
            "dtype, size, parameters, lora_format, lora_rank, folder_kind, sha256, autov1, "
            "autov3, crc32, trigger_words, source, source_ids, preview, notes, rating, favourite, "
            "first_seen, last_seen")


def _entry(row: sqlite3.Row | dict, tags: list[str], details: dict | None = None) -> Entry:
    values = dict(row)
    values["trigger_words"] = json.loads(values["trigger_words"] or "[]")
    values["source_ids"] = json.loads(values["source_ids"] or "{}")
    values["favourite"] = bool(values["favourite"])
    return Entry(**values, details=details or {}, tags=tags)


def _tags_of(db, ids: list[int]) -> dict[int, list[str]]:
    tags: dict[int, list[str]] = {}
    for chunk_start in range(0, len(ids), 500):
        chunk = ids[chunk_start:chunk_start + 500]
        marks = ",".join("?" * len(chunk))
        for row in db.execute(f"SELECT file_id, tag FROM tags WHERE file_id IN ({marks}) "
                              "ORDER BY tag", chunk):
            tags.setdefault(row[0], []).append(row[1])
    return tags


def get_entry(store: Store, file_id: int) -> Entry:
    row = store.db.execute(f"SELECT {_COLUMNS}, details FROM files WHERE id = ?",
                           (file_id,)).fetchone()
    if row is None:
        raise UserError(f"no catalog entry #{file_id}; `mergekit-sd catalog list` shows the ids")
    values = dict(row)
    details = json.loads(values.pop("details") or "{}")
    return _entry(values, _tags_of(store.db, [file_id]).get(file_id, []), details)


def find_entry(store: Store, ref: str) -> Entry:
    """The one entry `ref` names, or UserError saying why not (none, or which ones match)."""
    ids = _matching_ids(store, ref.strip())
    if not ids:
        raise UserError(f"{ref!r}: no catalog entry matches; `mergekit-sd catalog list --search "
                        "TEXT` finds entries, and `catalog scan` adds new files")
    if len(set(ids)) > 1:
        rows = store.db.execute(f"SELECT id, path FROM files WHERE id IN "
                                f"({','.join('?' * len(set(ids)))}) ORDER BY id",
                                sorted(set(ids))).fetchall()
        listing = "; ".join(f"#{r['id']} {r['path']}" for r in rows[:5])
        raise UserError(f"{ref!r} matches {len(rows)} entries ({listing}); use the #id or a "
                        "longer hash")
    return get_entry(store, ids[0])


def _matching_ids(store: Store, ref: str) -> list[int]:
    db = store.db
    bare = ref.removeprefix("#")
    # ASCII digits only: str.isdigit() is true of '²' and '٣', which int() refuses or reads
    # as another number; ids beyond SQLite's 64-bit integers cannot exist (a name, then)
    if (bare.isascii() and bare.isdigit() and int(bare) <= _MAX_ID
            and not ref.startswith(("sha256:", "catalog:"))):
        row = db.execute("SELECT id FROM files WHERE id = ?", (int(bare),)).fetchone()
        if row:
            return [row[0]]
    for scheme, column in (("sha256:", "sha256"), ("autov3:", "autov3")):
        if ref.lower().startswith(scheme):
            digits = ref[len(scheme):].strip().lower()
            if len(digits) < 10 or any(c not in "0123456789abcdef" for c in digits):
                raise UserError(f"{ref!r}: give at least 10 hex digits of the hash")
            rows = db.execute(f"SELECT id, {column} AS hash, status = 'missing' AS gone FROM "
                              f"files WHERE {column} >= ? AND {column} < ? "
                              "ORDER BY gone, id", (digits, digits + "g")).fetchall()
            # copies of one file share its hash, and any present copy is the file meant:
            # ambiguous only when the prefix names different files
            if len({r["hash"] for r in rows}) == 1:
                return [rows[0]["id"]]
            return [r["id"] for r in rows]
    name = ref.removeprefix("catalog:")
    rows = db.execute("SELECT id, status = 'missing' FROM files WHERE name = ? "
                      "ORDER BY status = 'missing', id", (name,)).fetchall()
    if not rows:
        rows = db.execute("SELECT id, status = 'missing' FROM files WHERE name = ? "
                          "COLLATE NOCASE ORDER BY status = 'missing', id", (name,)).fetchall()
    if rows:
        present = [r[0] for r in rows if r[1] == 0]
        # a name shared by a present file and missing ones means the present file
        return present if len(present) == 1 else [r[0] for r in rows]
    if not ref.startswith("catalog:"):
        path = os.path.abspath(os.path.expanduser(ref))
        row = db.execute("SELECT id FROM files WHERE path = ? OR path = ?",
                         (path, str(Path(path).resolve()))).fetchone()
        if row:
            return [row[0]]
    return []


@dataclass
class Filters:
    kind: str | None = None
    architecture: str | None = None
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    search: str | None = None
    status: str | None = None
    favourite: bool = False
    sort: str = "name"
    limit: int | None = None

    def narrowing(self) -> bool:
        """Whether any filter leaves entries out (an empty answer is then no sign of an
        empty catalog)."""
        return bool(self.kind or self.architecture or self.base_model or self.tags
                    or self.search or self.status or self.favourite)


def _choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` as one of `choices`, whatever its case; UserError naming them all if not."""
    folded = value.strip().lower()
    if folded not in choices:
        raise UserError(f"{option} {value!r}: choose one of {', '.join(choices)}")
    return folded


def list_entries(store: Store, filters: Filters) -> list[Entry]:
    if filters.sort not in SORTS:
        raise UserError(f"--sort {filters.sort!r}: choose one of {', '.join(SORTS)}")
    if filters.limit is not None and filters.limit < 1:
        raise UserError(f"--limit {filters.limit}: give 1 or more (leave it out to list every "
                        "entry)")
    kind = _choice("--kind", filters.kind, KINDS) if filters.kind else None
    status = _choice("--status", filters.status, STATUSES) if filters.status else None
    where, args = [], []
    if kind:
        # a sound file its contents could not name (a legacy pickle a scan does not load, a
        # .pt embedding of a format identification does not know) is what its folder holds
        where.append("(kind = ? OR (coalesce(kind, 'unknown') = 'unknown' AND status IN "
                     "('ok', 'unchecked') AND folder_kind = ?))")
        args.extend([kind, kind])
    for column, value in (("architecture", filters.architecture), ("status", status)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if filters.base_model:
        where.append("base_model = ? COLLATE NOCASE")
        args.append(filters.base_model)
    if filters.favourite:
        where.append("favourite = 1")
    for tag in filters.tags:  # without regard to case, as the other filters
        if not tag.strip():
            raise UserError(f"--tag {tag!r}: a tag cannot be empty or only spaces; give a word")
        where.append("id IN (SELECT file_id FROM tags WHERE casefold(tag) = ?)")
        args.append(tag.strip().casefold())
    if filters.search:
        # one case-insensitive substring search over what people remember a model by: also
        # the Civitai model and version names and the web UI's notes that `show` displays
        # (json_extract gives the text itself; the stored JSON escapes non-ASCII letters)
        texts = ["name", "path", "trigger_words", "notes", "coalesce(label, '')",
                 *(f"coalesce(json_extract(details, '$.sidecar.{key}'), '')"
                   for key in ("model_name", "version_name", "notes"))]
        where.append("(" + " OR ".join(f"instr(casefold({t}), ?)" for t in texts) + ")")
        args.extend([filters.search.casefold()] * len(texts))
    sql = f"SELECT {_COLUMNS} FROM files"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {SORTS[filters.sort]}, id"
    if filters.limit is not None:
        sql += f" LIMIT {int(filters.limit)}"
    rows = store.db.execute(sql, args).fetchall()
    tags = _tags_of(store.db, [r["id"] for r in rows]) if rows else {}
    return [_entry(row, tags.get(row["id"], [])) for row in rows]
