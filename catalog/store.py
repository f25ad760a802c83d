"""The catalog's SQLite store: where it lives, its schema, and transactions that never half-write.

Several processes (the TUI, CLI scans, tagging from a shell) use one catalog at once. WAL mode lets
readers run beside a writer; every write is one `BEGIN IMMEDIATE` transaction, which takes the
write lock up front (a deferred transaction that upgrades later can fail with "database is
locked" however long the busy timeout), and waits up to `BUSY_TIMEOUT_S` for it.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_sd.errors import UserError

ENV_VAR = "MERGEKIT_SD_CATALOG"
FILE_NAME = "catalog.sqlite"
BUSY_TIMEOUT_S = 60.0
SCHEMA_VERSION = 3
_TABLES = {"roots", "files", "tags", "parents"}
# SQLite's codes for a file whose pages are garbage (they show only when a page is read)
_DAMAGE_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")

# Version 1. Files are referenced in place by path; the catalog never moves or copies them.
_SCHEMA_V1 = """
CREATE TABLE roots (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    layout TEXT NOT NULL,            -- a1111, comfyui, plain
    added_at REAL NOT NULL
);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    root_id INTEGER REFERENCES roots(id) ON DELETE SET NULL,
    folder_kind TEXT,                -- what the folder holds by convention (lora, vae ...)
    name TEXT NOT NULL,
    status TEXT NOT NULL,            -- ok, missing, truncated, invalid, unreadable
    problem TEXT,                    -- the sentence that says what is wrong
    device INTEGER, inode INTEGER, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    kind TEXT, architecture TEXT, base_model TEXT, label TEXT, layout TEXT, dtype TEXT,
    parameters INTEGER, lora_format TEXT, lora_rank INTEGER,
    trigger_words TEXT NOT NULL DEFAULT '[]',    -- JSON list
    details TEXT NOT NULL DEFAULT '{}',          -- JSON: evidence, caveats, sidecar facts
    sidecars TEXT NOT NULL DEFAULT '',           -- signature of the sidecar files last read
    sha256 TEXT, autov1 TEXT, autov3 TEXT, crc32 TEXT,
    hash_key TEXT,                   -- device:inode:size:mtime_ns the hashes were computed for
    source TEXT NOT NULL DEFAULT 'local',        -- local, hf, civitai
    source_ids TEXT NOT NULL DEFAULT '{}',       -- JSON: civitai model/version ids, hf repo/file
    preview TEXT,
    notes TEXT NOT NULL DEFAULT '',
    rating INTEGER NOT NULL DEFAULT 0,
    favourite INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX files_root ON files(root_id);
CREATE INDEX files_sha256 ON files(sha256);
CREATE INDEX files_autov3 ON files(autov3);
CREATE INDEX files_identity ON files(device, inode);
CREATE INDEX files_kind ON files(kind, architecture);
CREATE TABLE tags (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (file_id, tag)
) WITHOUT ROWID;
CREATE INDEX tags_tag ON tags(tag);
CREATE TABLE parents (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    ref_kind TEXT NOT NULL,          -- sha256, autov1, autov3, name
    ref TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',   -- what the metadata calls the parent
    role TEXT NOT NULL,              -- merge input, training base, baked VAE ...
    PRIMARY KEY (file_id, ref_kind, ref, role)
) WITHOUT ROWID;
CREATE INDEX parents_ref ON parents(ref);
"""
# Version 2. Entry ids are never used again once deleted (AUTOINCREMENT): `#12` in a recipe must
# not name another model after #12 was removed. SQLite cannot add AUTOINCREMENT to a table, so
# `files` is copied into one made with it, ids and all (the tags and parents refer to them),
# and its indexes made again. Deriving the table from version 1 keeps one text of its columns.
_FILES_V1 = re.search(r"CREATE TABLE files \(.*?\n\);", _SCHEMA_V1, re.S).group(0)
_FILES_INDEXES = "".join(line + "\n" for line in _SCHEMA_V1.splitlines()
                         if line.startswith("CREATE INDEX files_"))
_SCHEMA_V2 = (
    _FILES_V1.replace("CREATE TABLE files (", "CREATE TABLE files_v2 (")
             .replace("id INTEGER PRIMARY KEY,", "id INTEGER PRIMARY KEY AUTOINCREMENT,", 1)
    + "\nINSERT INTO files_v2 SELECT * FROM files;\nDROP TABLE files;\n"
    "ALTER TABLE files_v2 RENAME TO files;\n" + _FILES_INDEXES
)
# Version 3. When a root's scan last saw its files present, and since when an entry is missing
# (its root's scan before the one that found the file gone): a copy of a vanished file is the
# file moved only when it appeared after that (catalog/moves.py).
_SCHEMA_V3 = """
ALTER TABLE roots ADD COLUMN scanned_at REAL;
ALTER TABLE files ADD COLUMN missing_since REAL;
"""
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


def catalog_path(explicit: str | os.PathLike | None = None) -> Path:
    """`--catalog PATH`, else $MERGEKIT_SD_CATALOG, else the user data folder."""
    return _named_path(explicit) or _default_path()


def _named_path(explicit: str | os.PathLike | None) -> Path | None:
    """The catalog the user named (`--catalog PATH` or $MERGEKIT_SD_CATALOG), if any."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return None


def _default_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("mergekit-sd", appauthor=False)) / FILE_NAME


def missing_catalog(explicit: str | os.PathLike | None = None) -> UserError | None:
    """The error for a catalog the user named (--catalog, $MERGEKIT_SD_CATALOG) that is not
    there, for commands that only read or edit entries: made there, a mistyped path would show
    an empty library and leave a stray file (and folders) behind. None when it is there, or
    when none was named (the default catalog is made on first use)."""
    named = _named_path(explicit)
    if named is None or named.exists():
        return None
    where = "--catalog" if explicit else f"${ENV_VAR}"
    return UserError(f"no catalog at {named} (named by {where}); check the path, or create one "
                     "with `mergekit-sd catalog add-root FOLDER`")


class Store:
    """One connection to the catalog database; not shared between threads (open one each)."""

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self.db = connection

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, create: bool = True) -> Store:
        """The catalog at `path` (see catalog_path). `create=False`: a catalog named by path
        that does not exist is a UserError, not a new empty one."""
        if not create and (missing := missing_catalog(path)) is not None:
            raise missing
        path = catalog_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            # SQLite's lower() folds ASCII only; searches fold "CAFÉ" and "café" alike
            db.create_function("casefold", 1, lambda t: t.casefold() if isinstance(t, str)
                               else t, deterministic=True)
            store = cls(path, db)
            store._refuse_foreign()  # before WAL mode, which rewrites the file's header
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            # with WAL, NORMAL loses at most the last commits on power loss, never consistency
            db.execute("PRAGMA synchronous = NORMAL")
            store._migrate()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{path}: cannot open the catalog ({exc}); check the file, or pass "
                            f"--catalog PATH / set {ENV_VAR} to use another") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot create the catalog ({exc.strerror}); pass "
                            f"--catalog PATH or set {ENV_VAR} to a writable place") from None
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        self.close()
        if _is_damage(exc):
            raise damaged(self.path, exc) from None

    @contextmanager
    def damage_said(self) -> Iterator[None]:
        """A damaged page met inside becomes one sentence (what `with store:` does on exit),
        for a store kept open across calls."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise damaged(self.path, exc) from None
            raise

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it lands, or (error, kill) none of it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise UserError(f"{self.path}: the catalog was written by a newer mergekit-sd "
                            f"(schema {version}); upgrade mergekit-sd to use it")
        # a table copied and dropped (version 2) would take the tags and parents with it
        # through ON DELETE CASCADE; the pragma is ignored inside a transaction, so set it here
        self.db.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.write() as db:
                # read again under the write lock: another process may have migrated meanwhile
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target].split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {target}")
                if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise sqlite3.DatabaseError("an entry's tags or parents lost their entry")
        finally:
            self.db.execute("PRAGMA foreign_keys = ON")

    def _refuse_foreign(self) -> None:
        """Another program's SQLite file: ours has all our tables, or (a new file) no table at
        all; adding our schema beside someone else's tables would change their file."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if (tables if version == 0 else _TABLES - tables) and version <= SCHEMA_VERSION:
            self.db.close()
            raise UserError(f"{self.path}: not a mergekit-sd catalog (another program's "
                            "database); pass --catalog PATH or set "
                            f"{ENV_VAR} to a catalog or a new file")


def _is_damage(exc: BaseException | None) -> bool:
    return (isinstance(exc, sqlite3.DatabaseError)
            and getattr(exc, "sqlite_errorname", "").startswith(_DAMAGE_CODES))


def damaged(path: Path, exc: sqlite3.DatabaseError) -> UserError:
    return UserError(f"{path}: the catalog is damaged ({exc}); move it away and build a new one "
                     "with `mergekit-sd catalog add-root` (tags, notes and ratings are lost), "
                     f"or pass --catalog PATH / set {ENV_VAR} to use another")
