"""Bring the catalog up to date with the folders: incremental, header-only, safe to interrupt.

A file whose size, mtime and inode are unchanged is not opened. New and changed files are
identified from their headers in worker processes; results land in batches, each one
transaction, so a killed scan keeps what it finished and the next scan picks up the rest.
A file that vanished is marked missing (its tags and notes stay); one that reappears under
another path with the same inode, or (after hashing) the same SHA256, is recognised as moved.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from catalog.hashes import hash_key
from catalog.identity import CIVITAI_BASE_MODELS, FileFacts, examine
from catalog.layouts import detect_layout
from catalog.moves import adopt, present_twin
from catalog.root_folders import folders_of
from catalog.sidecars import (
    PREVIEW_RECORD,
    SidecarFacts,
    read_sidecars,
    sidecar_paths,
    signature,
)
from catalog.store import Store
from catalog.walk import FoundFile, walk
from catalog.workers import exit_with
from mergekit_sd.errors import Cancelled, UserError
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress

BATCH = 250  # rows per transaction
PARALLEL_MIN = 48  # fewer new files than this are identified in-process (no pool start-up)


@dataclass
class ScanReport:
    roots: list[str] = field(default_factory=list)
    seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: list[tuple[str, str]] = field(default_factory=list)
    missing: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    partial: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # every file this scan found: a root inside another root finds the same files again, and
    # they are counted and read once
    found: set[str] = field(default_factory=set, repr=False)
    walked: list[int] = field(default_factory=list, repr=False)  # roots whose folders were there

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("found", "walked")}


def usable_cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than the
    machine has): more workers than these only wait on each other, each a process to start."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_jobs() -> int:
    return min(8, usable_cores())


def scan(store: Store, root_ids: list[int] | None = None, jobs: int | None = None,
         progress: ProgressCallback = no_progress, cancel: CancelToken | None = None
         ) -> ScanReport:
    """Scan the given roots (all by default) into the catalog."""
    started = time.perf_counter()
    report = ScanReport()
    rows = store.db.execute("SELECT id, path FROM roots ORDER BY id").fetchall()
    for root in rows:
        if root_ids is None or root["id"] in root_ids:
            _scan_root(store, root["id"], Path(root["path"]), jobs or default_jobs(), report,
                       progress, cancel)
    if report.walked:
        # the roots' files were seen present up to now: a copy first seen after this is new
        # (the end of the whole scan, not of each root, so that copies under two roots found by
        # one scan were there together)
        with store.write() as db:
            db.executemany("UPDATE roots SET scanned_at = ? WHERE id = ?",
                           [(time.time(), root_id) for root_id in report.walked])
    report.seconds = time.perf_counter() - started
    return report


def _scan_root(store: Store, root_id: int, root: Path, jobs: int, report: ScanReport,
               progress: ProgressCallback, cancel: CancelToken | None) -> None:
    report.roots.append(str(root))
    # every entry, not only this root's: a root inside another root shares files with it
    known = {row["path"]: row for row in store.db.execute(
        "SELECT id, path, root_id, device, inode, size, mtime_ns, status, problem, sidecars, "
        "last_seen, kind FROM files")}
    # when this root's files were last seen present: its previous scan (None: never, or by a
    # catalog too old to say)
    previous = store.db.execute("SELECT scanned_at FROM roots WHERE id = ?",
                                (root_id,)).fetchone()[0]
    # the entries this root holds: recorded by it, or under its folders (recorded first by a
    # root around it)
    prefixes = tuple(folder.rstrip(os.sep) + os.sep for folder in folders_of(root))
    existing = {path: row for path, row in known.items()
                if row["root_id"] == root_id or path.startswith(prefixes)}
    if not root.is_dir():
        report.problems.append(f"{root}: the root folder is not there (an unplugged drive?); "
                               "its files are marked missing")
        # files on a drive that is not there are missing, never moved to a copy elsewhere
        _mark_missing(store, [r for r in existing.values() if r["status"] != "missing"], report,
                      previous, may_have_moved=False)
        return
    try:
        layout = detect_layout(root, report.problems)
    except UserError as exc:  # gone or replaced since the check above: one root's problem
        report.problems.append(f"{exc}; skipped")
        return
    found = walk(layout.folders)
    report.problems.extend(found.problems)
    report.partial += found.partial

    to_examine: list[FoundFile] = []
    sidecars_only: list[tuple[int, FoundFile]] = []
    seen_paths = set()
    for file in found.files:
        key = str(file.path)
        seen_paths.add(key)
        if key in report.found:  # an earlier root of this scan holds it too: done there
            continue
        report.found.add(key)
        report.seen += 1
        row = known.get(key)
        if row is None:
            to_examine.append(file)
        # "pickle": what scans recorded of .ckpt/.pt/.pth/.bin files before they read them;
        # "does not exist": what they recorded of a file that vanished while they ran
        elif row["status"] == "missing" or row["kind"] == "pickle" or (
                row["problem"] == "does not exist") or (
                row["device"], row["inode"], row["size"], row["mtime_ns"]) != (
                file.device, file.inode, file.size, file.mtime_ns):
            report.changed += 1
            to_examine.append(file)
        else:
            report.unchanged += 1
            if row["sidecars"] != signature(file.sidecars):
                sidecars_only.append((row["id"], file))

    new_files = [f for f in to_examine if str(f.path) not in known]
    moved, examine_again = _adopt_moves(store, root_id, new_files, report)
    to_examine = [f for f in to_examine
                  if str(f.path) not in moved or str(f.path) in examine_again]
    report.new += len(new_files) - len(moved)

    facts = examine_files([str(f.path) for f in to_examine], jobs, progress, cancel)
    vanished = 0
    for batch in _batches(zip(to_examine, facts, strict=True), BATCH):
        with store.write() as db:
            for file, file_facts in batch:
                if file_facts.status == "gone":
                    # an entry for a path that is not there would be a lasting wrong one
                    vanished += 1
                    if str(file.path) in known:
                        report.changed -= 1
                    elif str(file.path) not in moved:
                        report.new -= 1
                    continue
                _upsert(db, root_id, file, file_facts, report.problems)
                if file_facts.status != "ok":
                    report.bad.append((str(file.path), file_facts.problem or file_facts.status))
    if vanished:
        report.problems.append(f"{vanished} file(s) were renamed or deleted while the scan ran; "
                               "the next scan records where they went")
    if sidecars_only:
        with store.write() as db:
            for file_id, file in sidecars_only:
                _refresh_sidecars(db, file_id, file, report.problems)
    moved_from = {old for old, _ in report.moved}
    gone = [row for path, row in existing.items()
            if path not in seen_paths and path not in report.found and path not in moved_from
            and row["status"] != "missing" and not os.path.exists(path)]
    _mark_missing(store, gone, report, previous, may_have_moved=True)
    report.walked.append(root_id)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def examine_files(paths: list[str], jobs: int, progress: ProgressCallback = no_progress,
                  cancel: CancelToken | None = None) -> Iterator[FileFacts]:
    """Each file's facts, in order; in `jobs` worker processes (at most one per usable core)
    when there are many files."""
    total = len(paths)
    if not total:
        return
    progress("identifying", 0, total)
    jobs = min(jobs, total, usable_cores())
    if jobs <= 1 or total < PARALLEL_MIN:
        results: Iterator[FileFacts] = map(examine, paths)
        pool = None
    else:
        # forkserver: workers start from a clean process that imported the identification code
        # once, and never inherit a parent's threads (the TUI has some) mid-lock
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["catalog.identity", "catalog.workers"])
        # a killed scan runs no clean-up: the workers leave by themselves (catalog/workers.py)
        pool = ProcessPoolExecutor(jobs, mp_context=context,
                                   initializer=exit_with, initargs=(os.getpid(),))
        results = pool.map(examine, paths, chunksize=max(1, min(32, total // (jobs * 8))))
    try:
        for done, facts in enumerate(results, 1):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("scan cancelled; what was scanned so far is kept")
            yield facts
            progress("identifying", done, total)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _adopt_moves(store: Store, root_id: int, new_files: list[FoundFile],
                 report: ScanReport) -> tuple[set[str], set[str]]:
    """New paths that are files the catalog knows under a path that no longer exists (same
    device, inode, size and mtime: a rename or a move within the disk), or under a path that
    leads to it through a link (recorded before files were recorded by their real paths): the
    row follows the file, keeping its tags, notes and hashes. Returns those paths, and those
    of them to examine again: an entry that was not `ok` (missing: its status before is not
    known) may be wrong about the file."""
    moved: set[str] = set()
    again: set[str] = set()
    if not new_files:
        return moved, again
    with store.write() as db:
        for file in new_files:
            for row in db.execute(
                    "SELECT id, path, status FROM files WHERE device = ? AND inode = ? AND "
                    "size = ? AND mtime_ns = ?",
                    (file.device, file.inode, file.size, file.mtime_ns)):
                linked = os.path.realpath(row["path"]) == str(file.path)
                if row["path"] != str(file.path) and (linked or not os.path.exists(row["path"])):
                    db.execute("UPDATE files SET path = ?, root_id = ?, folder_kind = ?, "
                               "name = ?, status = CASE status WHEN 'missing' THEN 'ok' ELSE "
                               "status END, sidecars = '', last_seen = ?, updated_at = ? "
                               "WHERE id = ?", (str(file.path), root_id, file.folder_kind,
                                                _stem(file.path), time.time(), time.time(),
                                                row["id"]))
                    _refresh_sidecars(db, row["id"], file, report.problems)
                    moved.add(str(file.path))
                    if row["status"] != "ok":
                        again.add(str(file.path))
                    if linked:  # the same file under its real name is no move
                        report.unchanged += 1
                    else:
                        report.moved.append((row["path"], str(file.path)))
                    break
    return moved, again


def _mark_missing(store: Store, rows, report: ScanReport, previous: float | None,
                  may_have_moved: bool) -> None:
    """Vanished files become missing entries, keeping their data. One whose identical copy
    (hashed under another root scanned first) appeared after the file was last seen present
    is that file moved: its entry's user data joins the copy's and the stale entry goes (see
    catalog/moves.py). `previous`: when the root's scan last saw its files."""
    if not rows:
        return
    with store.write() as db:
        for row in rows:
            # seen present at the root's last scan, or later when a download recorded it
            seen = None if previous is None else max(previous, row["last_seen"])
            sha256 = db.execute("SELECT sha256 FROM files WHERE id = ?",
                                (row["id"],)).fetchone()[0]
            twin = (present_twin(db, row["id"], sha256, seen)
                    if may_have_moved and sha256 and seen is not None else None)
            if twin is not None:
                adopt(db, row["id"], twin["id"])
                report.moved.append((row["path"], twin["path"]))
                continue
            db.execute("UPDATE files SET status = 'missing', missing_since = ?, updated_at = ? "
                       "WHERE id = ?", (seen, time.time(), row["id"]))
            report.missing += 1


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def merged_columns(header: dict, sidecar: SidecarFacts) -> dict:
    """The columns that both the header and the sidecars speak to; sidecars win (a Civitai
    page knows Pony from SDXL, the weights do not)."""
    base = sidecar.base_model
    if base is None and sidecar.architecture:
        base = CIVITAI_BASE_MODELS.get(sidecar.architecture)
    return {
        "base_model": base or header.get("base_model"),
        "trigger_words": json.dumps(sidecar.trained_words or header.get("trigger_words", []),
                                    ensure_ascii=False),  # searchable as typed
        "preview": sidecar.preview,
    }


def _sidecar_details(sidecar: SidecarFacts) -> dict:
    return {k: v for k, v in asdict(sidecar).items()
            if v not in (None, "", []) and k not in ("trained_words", "preview",
                                                      "stale_version_ids")}


def _source_ids(sidecar: SidecarFacts) -> dict:
    if sidecar.version_id is None and sidecar.model_id is None:
        return {}
    return {"civitai": {"model_id": sidecar.model_id, "version_id": sidecar.version_id}}


# A file seen before keeps its user data (tags, notes, rating), the record of the preview saved
# beside it (`identify --refresh` checks the preview's name and bytes before taking it for its
# own) and, while it is the same file (device, inode, size, mtime), its hashes. An UPDATE, then
# an INSERT only for a new path: an INSERT ... ON CONFLICT DO UPDATE would use up an
# AUTOINCREMENT id every time it updates.
_COLUMNS = ("path", "root_id", "folder_kind", "name", "status", "problem", "device", "inode",
            "size", "mtime_ns", "kind", "architecture", "base_model", "label", "layout", "dtype",
            "parameters", "lora_format", "lora_rank", "trigger_words", "details", "sidecars",
            "preview", "source", "source_ids", "first_seen", "last_seen", "updated_at")
_SAME_FILE = ("device IS :device AND inode IS :inode AND size = :size AND "
              "mtime_ns = :mtime_ns")
_REPLACED = ("status", "problem", "device", "inode", "size", "mtime_ns", "kind", "architecture",
             "base_model", "label", "layout", "dtype", "parameters", "lora_format", "lora_rank",
             "trigger_words", "sidecars", "preview", "last_seen", "updated_at")
_UPDATE = ("UPDATE files SET "
           # a file under two roots (one inside the other) stays with the first
           "root_id = coalesce(root_id, :root_id), "
           "folder_kind = coalesce(folder_kind, :folder_kind), "
           # (every expression reads the row as it was) hashes of the file as it was are not
           # the file's any more
           + "".join(f"{h} = CASE WHEN {_SAME_FILE} THEN {h} END, "
                     for h in ("sha256", "autov1", "autov3", "crc32", "hash_key"))
           + "".join(f"{c} = :{c}, " for c in _REPLACED)
           # json(): the record set as the object it is, not as a string of its text
           + f"details = CASE WHEN json_type(details, '{PREVIEW_RECORD}') = 'object' THEN "
           f"json_set(:details, '{PREVIEW_RECORD}', json(json_extract(details, "
           f"'{PREVIEW_RECORD}'))) ELSE :details END, "
           + "source = CASE WHEN source = 'local' THEN :source ELSE source END, "
           "source_ids = json_patch(source_ids, :source_ids) "
           "WHERE path = :path RETURNING id")
_INSERT = (f"INSERT INTO files ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join(':' + c for c in _COLUMNS)}) RETURNING id")


def _upsert(db, root_id: int, file: FoundFile, facts: FileFacts,
            problems: list[str] | None = None) -> int:
    """Record a file's facts and its sidecars'; the id of its entry. The sidecars' problems
    (a bad JSON file, a pipe under a sidecar's name) go to `problems`, for the scan to show."""
    sidecar = read_sidecars(file.sidecars, _known_sha256(db, file.path))
    if problems is not None:
        problems.extend(sidecar.problems)
    header = {"base_model": facts.base_model, "trigger_words": facts.trigger_words}
    details = {**facts.details, "header": header, "sidecar": _sidecar_details(sidecar)}
    merged = merged_columns(header, sidecar)
    ids = _source_ids(sidecar)
    now = time.time()
    values = dict(zip(_COLUMNS, (
        str(file.path), root_id, file.folder_kind, _stem(file.path), facts.status,
        facts.problem, file.device, file.inode, file.size, file.mtime_ns, facts.kind,
        facts.architecture, merged["base_model"], facts.label, facts.layout, facts.dtype,
        facts.parameters, facts.lora_format, facts.lora_rank, merged["trigger_words"],
        json.dumps(details), signature(file.sidecars), merged["preview"],
        "civitai" if ids else "local", json.dumps(ids), now, now, now), strict=True))
    row = (db.execute(_UPDATE, values).fetchone()
           or db.execute(_INSERT, values).fetchone())
    file_id = row[0]
    _drop_stale_ids(db, file_id, sidecar)
    db.execute("DELETE FROM parents WHERE file_id = ?", (file_id,))
    db.executemany("INSERT OR IGNORE INTO parents (file_id, ref_kind, ref, name, role) "
                   "VALUES (?, ?, ?, ?, ?)",
                   [(file_id, p.ref_kind, p.ref, p.name, p.role) for p in facts.parents])
    return file_id


def scan_file(store: Store, root_id: int, path: Path) -> int:
    """Record one file of a root now (a download just finished), as a scan of the root would;
    returns its entry id."""
    path = Path(os.path.realpath(path))  # as a scan records it
    st = path.stat()
    root = Path(store.db.execute("SELECT path FROM roots WHERE id = ?", (root_id,)).fetchone()[0])
    # a download is recorded even where the root's extra_model_paths.yaml is broken
    kinds = [(real, f.kind) for f in detect_layout(root, problems=[]).folders
             if path.is_relative_to(real := Path(os.path.realpath(f.path)))]
    folder_kind = max(kinds, key=lambda item: len(item[0].parts))[1] if kinds else None
    file = FoundFile(path, folder_kind, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                     sidecar_paths(path))
    facts = examine(str(path))
    with store.write() as db:
        return _upsert(db, root_id, file, facts)


def refresh_sidecars_of(store: Store, file_id: int, path: Path) -> None:
    """Read a file's sidecars again after they were written (Civitai identification)."""
    file = FoundFile(path, None, 0, 0, 0, 0, sidecar_paths(path))
    with store.write() as db:
        _refresh_sidecars(db, file_id, file)


def _refresh_sidecars(db, file_id: int, file: FoundFile,
                      problems: list[str] | None = None) -> None:
    """Re-read a file's sidecars when only they changed (the model file was not touched); their
    problems go to `problems`."""
    row = db.execute("SELECT details FROM files WHERE id = ?", (file_id,)).fetchone()
    details = json.loads(row["details"] or "{}")
    sidecar = read_sidecars(file.sidecars, _known_sha256(db, file.path))
    if problems is not None:
        problems.extend(sidecar.problems)
    details["sidecar"] = _sidecar_details(sidecar)
    merged = merged_columns(details.get("header", {}), sidecar)
    ids = _source_ids(sidecar)
    db.execute("UPDATE files SET base_model = ?, trigger_words = ?, preview = ?, details = ?, "
               "sidecars = ?, source = CASE WHEN source = 'local' AND ? THEN 'civitai' ELSE "
               "source END, source_ids = json_patch(source_ids, ?), updated_at = ? WHERE id = ?",
               (merged["base_model"], merged["trigger_words"], merged["preview"],
                json.dumps(details), signature(file.sidecars), bool(ids), json.dumps(ids),
                time.time(), file_id))
    _drop_stale_ids(db, file_id, sidecar)


def recheck_sidecars(store: Store, file_id: int, path: Path) -> list[str]:
    """After a file was hashed: where its `.civitai.info` lists other SHA256s, or its
    `.cm-info.json` names another, the sidecar was left by another file under this name; the
    entry loses what it gave (see _drop_stale_ids). Returns the problems to report."""
    row = store.db.execute("SELECT sha256, json_extract(details, '$.sidecar.file_sha256s'), "
                           "json_extract(details, '$.sidecar.matrix_sha256') FROM files "
                           "WHERE id = ?", (file_id,)).fetchone()
    if row is None or ((not row[1] or row[0] in json.loads(row[1]))
                       and (not row[2] or row[0] == row[2])):
        return []
    problems: list[str] = []
    with store.write() as db:
        _refresh_sidecars(db, file_id, FoundFile(path, None, 0, 0, 0, 0, sidecar_paths(path)),
                          problems)
    return problems


def _known_sha256(db, path: Path) -> str | None:
    """The SHA256 of the file at `path` as it is now, where the catalog has it; None until it
    is hashed (the sidecars are trusted till then)."""
    try:
        key = hash_key(os.stat(path))
    except OSError:
        return None
    row = db.execute("SELECT sha256 FROM files WHERE path = ? AND hash_key = ?",
                     (str(path), key)).fetchone()
    return row[0] if row else None


def _drop_stale_ids(db, file_id: int, sidecar: SidecarFacts) -> None:
    """The Civitai ids a stale `.civitai.info` or `.cm-info.json` gave the entry (or a pull of
    the file that was here before) are another file's: `pull` must not take this file for that
    version. Not where a sidecar of this file names the same version (another file of it)."""
    stale = set(sidecar.stale_version_ids) - {sidecar.version_id}
    if not stale:
        return
    row = db.execute("SELECT source, source_ids FROM files WHERE id = ?", (file_id,)).fetchone()
    ids = json.loads(row["source_ids"] or "{}")
    if (ids.get("civitai") or {}).get("version_id") not in stale:
        return
    del ids["civitai"]
    # the source the ids left name ("hf", "url": ids and sources share their names)
    source = row["source"] if row["source"] != "civitai" else next(iter(ids), "local")
    db.execute("UPDATE files SET source = ?, source_ids = ?, updated_at = ? WHERE id = ?",
               (source, json.dumps(ids), time.time(), file_id))

