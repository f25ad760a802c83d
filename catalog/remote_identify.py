"""`catalog identify` and `catalog updates`: what Civitai knows of the files the catalog holds.

Identification looks every hashed file up by SHA256 in bulk: one request tells which of up to
10,000 hashes Civitai knows, then one request per 100 known ones fetches their versions. Each
file found gets `.civitai.info` and a preview beside it, and its entry the names, base model,
trigger words and source ids they carry (through the same sidecar reading as a scan). A file
identified before (it has `.civitai.info`) is not looked up again unless asked (`refresh`); then
a preview saved by this tool follows the new information (catalog/civitai_sidecars.py).

Updates group the files that came from Civitai by model and fetch those models in bulk (100 a
request); a model whose newest version is newer than every owned one is an update.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from catalog.civitai import CivitaiClient, mapping, sequence, unexpected
from catalog.civitai_sidecars import write_version_sidecars
from catalog.register import record_source, remember_preview, saved_preview
from catalog.scan import refresh_sidecars_of
from catalog.sidecars import CIVITAI_INFO
from catalog.store import Store
from mergekit_sd.errors import Cancelled
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress


@dataclass
class Identified:
    entry_id: int
    path: str
    model: str | None
    version: str | None
    base_model: str | None
    version_id: int
    preview: str | None


@dataclass
class IdentifyReport:
    looked_up: int = 0  # distinct hashes sent
    identified: list[Identified] = field(default_factory=list)
    unknown: int = 0  # hashed files Civitai does not know
    skipped: int = 0  # identified before (have .civitai.info); --refresh looks again
    unhashed: int = 0  # files with no SHA256 yet: `catalog scan --hash` first
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def identify(store: Store, client: CivitaiClient, *, refresh: bool = False,
             nsfw_previews: bool = False, progress: ProgressCallback = no_progress,
             cancel: CancelToken | None = None) -> IdentifyReport:
    report = IdentifyReport()
    rows = store.db.execute("SELECT id, path, sha256, json_extract(details, '$.sidecar.read') "
                            "AS sidecars_read FROM files WHERE status = 'ok' ORDER BY id"
                            ).fetchall()
    pending: dict[str, list] = {}  # sha256 -> entries with that content
    for row in rows:
        if not row["sha256"]:
            report.unhashed += 1
        elif not refresh and _identified(Path(row["path"]), row["sidecars_read"]):
            report.skipped += 1
        else:
            pending.setdefault(row["sha256"], []).append(row)
    report.looked_up = len(pending)
    if not pending:
        return report
    progress("identifying", 0, len(pending))
    known = client.version_ids_by_hashes(pending)
    versions = _versions_by_sha256(client.versions_by_hashes(known)) if known else {}
    # checked before any file gets a sidecar: a half-applied version (its .civitai.info written,
    # its ids not recorded) would be skipped as "identified before" by every later run
    if any(not _valid_id(version.get("id")) for version in versions.values()):
        raise unexpected(f"the look-up of {len(known)} file hashes")
    report.unknown = sum(len(entries) for sha, entries in pending.items() if sha not in known)
    for done, (sha, entries) in enumerate(pending.items(), 1):
        if cancel is not None and cancel.cancelled:
            raise Cancelled("identification cancelled; the files done so far keep what was "
                            "found")
        version = versions.get(sha)
        if version is not None:
            for row in entries:
                _apply(store, client, row, version, nsfw_previews, refresh, report)
        progress("identifying", done, len(pending))
    return report


def _identified(model: Path, sidecars_read: str | None) -> bool:
    """Whether the file has a `.civitai.info` that the catalog took as its own: one that
    describes another file (left by a file once under this name) is no identification."""
    stem = model.name[: -len(model.suffix)] if model.suffix else model.name
    try:
        taken = json.loads(sidecars_read) if sidecars_read else []
    except ValueError:
        taken = []
    return stem + CIVITAI_INFO in taken and (model.parent / (stem + CIVITAI_INFO)).is_file()


def _valid_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _versions_by_sha256(versions: list[dict]) -> dict[str, dict]:
    """Each file hash of the answered versions -> its version (the answer does not say which
    hash asked for which version)."""
    found = {}
    for version in versions:
        for file in sequence(version.get("files")):
            sha = mapping(mapping(file).get("hashes")).get("SHA256")
            if isinstance(sha, str):
                found[sha.lower()] = version
    return found


def _apply(store: Store, client: CivitaiClient, row, version: dict, nsfw_previews: bool,
           refresh: bool, report: IdentifyReport) -> None:
    path = Path(row["path"])
    if not path.exists():
        report.problems.append(f"{path}: gone since it was hashed; run `mergekit-sd catalog "
                               "scan`")
        return
    earlier = saved_preview(store, row["id"])
    try:
        # --refresh: a preview saved with the earlier information follows the new one
        written = write_version_sidecars(path, version, client.http, nsfw_previews,
                                         earlier=earlier, replace=refresh)
    except OSError as exc:
        report.problems.append(f"{path}: cannot write its sidecars ({exc.strerror}); skipped")
        return
    report.problems.extend(written.problems)
    refresh_sidecars_of(store, row["id"], path)
    if written.record != earlier:
        remember_preview(store, row["id"], written.record)
    record_source(store, row["id"], "civitai", {"civitai": {
        "model_id": version.get("modelId"), "version_id": version.get("id")}})
    model = mapping(version.get("model"))
    report.identified.append(Identified(
        row["id"], str(path), model.get("name"), version.get("name"), version.get("baseModel"),
        int(version["id"]), str(written.preview) if written.preview else None))


@dataclass
class Update:
    model_id: int
    model: str
    owned: list[dict]  # {version_id, version, path} of each owned version
    newer: list[dict]  # {version_id, version, base_model, published} newest first

    def to_dict(self) -> dict:
        return asdict(self)


def find_updates(store: Store, client: CivitaiClient) -> tuple[list[Update], int]:
    """Models with a version newer than the ones owned, and how many models were checked."""
    owned: dict[int, list[dict]] = {}
    for row in store.db.execute(
            "SELECT path, json_extract(source_ids, '$.civitai.model_id') AS model_id, "
            "json_extract(source_ids, '$.civitai.version_id') AS version_id, details FROM files "
            "WHERE status != 'missing' AND model_id IS NOT NULL AND version_id IS NOT NULL"):
        if not os.path.exists(row["path"]):
            continue
        sidecar = json.loads(row["details"] or "{}").get("sidecar", {})
        owned.setdefault(int(row["model_id"]), []).append(
            {"version_id": int(row["version_id"]), "version": sidecar.get("version_name"),
             "path": row["path"]})
    updates = []
    for model in client.models_by_ids(owned):
        have = owned.get(model.get("id"))
        if not have:
            continue
        have_ids = {v["version_id"] for v in have}
        versions = [v for v in model.get("modelVersions") or [] if isinstance(v, dict)]
        # Civitai lists versions newest first: those before the first owned one are newer
        newer = []
        for version in versions:
            if version.get("id") in have_ids:
                break
            newer.append({"version_id": version.get("id"), "version": version.get("name"),
                          "base_model": version.get("baseModel"),
                          "published": version.get("publishedAt") or version.get("createdAt")})
        else:
            newer = []  # none of the owned versions is listed any more: nothing to compare
        if newer:
            updates.append(Update(int(model["id"]), str(model.get("name")), have, newer))
    return updates, len(owned)
