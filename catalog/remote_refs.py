"""References to remote files (`civitai://VERSION_ID`, `civitai://model/MODEL_ID`,
`hf://org/repo[@revision]/path`, plain http(s) URLs) and the catalog entries that came from them.

Kept free of network libraries: the recipe resolver reads these on every `plan`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from catalog.entries import Entry, get_entry
from catalog.hash_cache import hash_key
from catalog.safe_names import bare_url, printable_ref
from catalog.store import Store
from mergekit_sd.errors import UserError


@dataclass(frozen=True)
class CivitaiVersionRef:
    version_id: int

    def __str__(self) -> str:
        return f"civitai://{self.version_id}"


@dataclass(frozen=True)
class CivitaiModelRef:
    model_id: int  # its newest version

    def __str__(self) -> str:
        return f"civitai://model/{self.model_id}"


@dataclass(frozen=True)
class HubRef:
    repo: str
    path: str  # a file, or a glob pattern (`*.safetensors`)
    revision: str | None = None

    @property
    def is_pattern(self) -> bool:
        return any(c in self.path for c in "*?[")

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}{at}/{self.path}"


@dataclass(frozen=True)
class UrlRef:
    url: str

    def __str__(self) -> str:
        return self.url


RemoteRef = CivitaiVersionRef | CivitaiModelRef | HubRef | UrlRef
REMOTE_SCHEMES = ("civitai://", "hf://", "http://", "https://")
_HUB = re.compile(r"hf://(?P<org>[^/@\s]+)/(?P<name>[^/@\s]+)(?:@(?P<rev>[^/\s]+))?/(?P<path>.+)")
# an id stored in the catalog must fit SQLite's INTEGER (Civitai's ids are far below it)
MAX_ID = 2**63 - 1
_ID = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit() also takes "²"
# the Hub's own rule for each half of ORG/REPO: letters, digits, _ - . (at most 96), starting
# and ending with a letter, digit or _, without "--" or ".." (huggingface_hub refuses the rest
# with an exception of its own, before any request)
_REPO_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")


def path_matches(pattern: str, path: str) -> bool:
    """A shell-style glob over a repository path: `*`, `?` and `[...]` stay within one folder
    (as in a shell, and unlike fnmatch), and a `**` part spans any number of folders."""
    return _parts_match(pattern.split("/"), path.split("/"))


def _parts_match(patterns: list[str], parts: list[str]) -> bool:
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_parts_match(patterns[1:], parts[i:]) for i in range(len(parts) + 1))
    return (bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0])
            and _parts_match(patterns[1:], parts[1:]))


def valid_repo_id(repo: str) -> bool:
    parts = repo.split("/")
    return (len(parts) in (1, 2) and all(_REPO_PART.fullmatch(p) for p in parts)
            and "--" not in repo and ".." not in repo and not repo.endswith(".git"))


def check_repo_id(repo: str, shown: str, form: str = "hf://ORG/REPO/PATH") -> None:
    if not valid_repo_id(repo):
        raise UserError(f"{shown!r}: not a valid repository id (letters, digits, _ - . in "
                        f"ORG/REPO, no '..' or '--'); write {form}")


def is_remote_ref(ref: str) -> bool:
    return ref.strip().lower().startswith(REMOTE_SCHEMES)  # schemes ignore case (RFC 3986)


def _civitai_id(text: str) -> int | None:
    if not _ID.fullmatch(text) or int(text) > MAX_ID:
        return None
    return int(text)


def _checked_url(url: str) -> str:
    """`url` when it has a host (and a numeric port, if any); UserError otherwise: an address
    that cannot work is the user's to fix, not a network failure to retry."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or not parts.hostname or any(c.isspace() for c in url):
        raise UserError(f"{printable_ref(url)!r}: not a valid URL (it needs a host, and a port "
                        "that is a number); check the link")
    return url


def parse_remote_ref(ref: str) -> RemoteRef:
    """The reference `ref` names; UserError saying the accepted forms when it is none."""
    ref = ref.strip()
    scheme, sep, rest = ref.partition("://")
    if sep:  # schemes are case-insensitive (RFC 3986): HTTP://, Civitai:// are fine
        ref = f"{scheme.lower()}://{rest}"
    if ref.startswith("civitai://"):
        rest = ref[len("civitai://"):].strip("/")
        if (version_id := _civitai_id(rest)) is not None:
            return CivitaiVersionRef(version_id)
        if rest.startswith("model/") and (model_id := _civitai_id(rest[6:])) is not None:
            return CivitaiModelRef(model_id)
        raise UserError(f"{ref!r}: write civitai://VERSION_ID or civitai://model/MODEL_ID (the "
                        "numbers in the model page's address: ?modelVersionId=... and "
                        "/models/...)")
    if ref.startswith("hf://"):
        match = _HUB.fullmatch(ref)
        if not match or match["path"].startswith("/") or ".." in match["path"].split("/"):
            raise UserError(f"{ref!r}: write hf://ORG/REPO/PATH (or hf://ORG/REPO@REVISION/PATH)"
                            ", for example hf://org/repo/model.safetensors")
        repo = f"{match['org']}/{match['name']}"
        check_repo_id(repo, ref)
        return HubRef(repo, match["path"], match["rev"])
    if ref.startswith(("http://", "https://")):
        return UrlRef(_checked_url(ref))
    raise UserError(f"{printable_ref(ref)!r}: not a download reference; use civitai://VERSION_ID, "
                    "civitai://model/MODEL_ID, hf://ORG/REPO/PATH or an http(s) URL")


def owned_entry(store: Store, ref: RemoteRef, listed: Collection[str] = ()) -> Entry | None:
    """The present catalog file that came from `ref`, if any (the newest version for a model
    reference). For Civitai, a file hashed since it last changed must be one of the files the
    version lists (`listed`: their SHA256s, where the caller has Civitai's answer; else those
    of the entry's `.civitai.info`): a file replaced under the same name is not the version's.
    A file not hashed yet is taken on its sidecar's word (pull hashes it first)."""
    if isinstance(ref, CivitaiVersionRef):
        where, args = "json_extract(source_ids, '$.civitai.version_id') = ?", [ref.version_id]
    elif isinstance(ref, CivitaiModelRef):
        where, args = "json_extract(source_ids, '$.civitai.model_id') = ?", [ref.model_id]
    elif isinstance(ref, HubRef) and not ref.is_pattern:
        where = ("json_extract(source_ids, '$.hf.repo') = ? AND "
                 "json_extract(source_ids, '$.hf.path') = ?")
        args = [ref.repo, ref.path]
        if ref.revision:
            where += (" AND ? IN (json_extract(source_ids, '$.hf.revision'), "
                      "json_extract(source_ids, '$.hf.commit'))")
            args.append(ref.revision)
    elif isinstance(ref, UrlRef):  # recorded without the query (see pull)
        where, args = "json_extract(source_ids, '$.url') = ?", [bare_url(ref.url)]
    else:
        return None
    rows = store.db.execute(
        f"SELECT id, path, sha256, hash_key, json_extract(details, '$.sidecar.file_sha256s') "
        f"AS sidecar_listed FROM files WHERE {where} AND status NOT IN ('missing', 'invalid', "
        "'truncated') ORDER BY json_extract(source_ids, '$.civitai.version_id') DESC, id",
        args).fetchall()
    civitai = isinstance(ref, CivitaiVersionRef | CivitaiModelRef)
    for row in rows:
        try:
            st = os.stat(row["path"])
        except OSError:
            continue
        known = row["sha256"] if row["hash_key"] == hash_key(st) else None
        expected = listed or json.loads(row["sidecar_listed"] or "[]")
        if civitai and known and expected and known not in expected:
            continue
        return get_entry(store, row["id"])
    return None


def owned_by_sha256(store: Store, sha256: str) -> Entry | None:
    """A present catalog file with exactly these bytes (hashed, and unchanged since)."""
    rows = store.db.execute("SELECT id, path, hash_key FROM files WHERE sha256 = ? AND status = "
                            "'ok' ORDER BY id", (sha256.lower(),)).fetchall()
    for row in rows:
        try:
            st = os.stat(row["path"])
        except OSError:
            continue
        if row["hash_key"] == hash_key(st):
            return get_entry(store, row["id"])
    return None
