"""Civitai's public API as the real one shapes it: /api/v1/models (search with cursor paging and
its filters, ids), /models/{id}, /model-versions/{id}, /model-versions/by-hash/{hash}, POST
/model-versions/by-hash (100 hashes) and /by-hash/ids (10,000), and /api/download/models/{id}
with its selectors, answering 307 to the storage host's signed URL.

Refusals are the real ones: a download without an account is 401 JSON when the request says
`Content-Type: application/json` and otherwise a redirect to the HTML login page; early access
is 403 `{"error": "Early Access", "deadline": ...}`; an unknown id 404; an archived model 410;
`fail(path, 429, 503)` queues busy answers for a path.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

from fakes.files import FileHost
from fakes.loopback import LoopbackServer, Reply, Seen, json_reply

TOKEN = "civitai-secret-token-0123456789"


@dataclass
class FakeFile:
    name: str
    data: bytes
    id: int = 0
    type: str = "Model"
    format: str = "SafeTensor"
    size: str = "pruned"
    fp: str = "fp16"
    primary: bool = True
    served_name: str | None = None  # the storage host's Content-Disposition name
    sha256: str | None = None  # what the API claims (default: the real hash)


@dataclass
class FakeVersion:
    id: int
    model_id: int
    name: str
    base_model: str
    files: list[FakeFile]
    trained_words: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    early_access_until: str | None = None
    needs_account: bool = False
    published_at: str = "2025-06-01T10:00:00.000Z"


@dataclass
class FakeModel:
    id: int
    name: str
    type: str = "LORA"
    nsfw: bool = False
    mode: str | None = None  # "Archived", "TakenDown"
    tags: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # newest first


class FakeCivitai:
    def __init__(self, files: FileHost, token: str = TOKEN):
        self.files = files
        self.token = token
        self.models: dict[int, FakeModel] = {}
        self.versions: dict[int, FakeVersion] = {}
        self.queued: list[tuple[str, int]] = []  # (path prefix, status) answered first
        self._next_file_id = 9000
        self.server = LoopbackServer(self.handle)

    @property
    def url(self) -> str:
        return self.server.url

    # --- set-up -------------------------------------------------------------------------------

    def add_model(self, model_id: int, name: str, type: str = "LORA", **fields) -> FakeModel:
        self.models[model_id] = FakeModel(model_id, name, type, **fields)
        return self.models[model_id]

    def add_version(self, model_id: int, version_id: int, name: str, base_model: str,
                    files: list[FakeFile], **fields) -> FakeVersion:
        for file in files:
            if not file.id:
                self._next_file_id += 1
                file.id = self._next_file_id
            self.files.put(self.storage_name(version_id, file), file.data,
                           disposition_name=file.served_name or file.name)
        version = FakeVersion(version_id, model_id, name, base_model, files, **fields)
        self.versions[version_id] = version
        self.models[model_id].versions.insert(0, version_id)  # newest first, as Civitai lists
        return version

    @staticmethod
    def storage_name(version_id: int, file: FakeFile) -> str:
        return f"model/{version_id}/{file.id}"

    def fail(self, path_prefix: str, *statuses: int) -> None:
        self.queued.extend((path_prefix, status) for status in statuses)

    def api_requests(self) -> list[Seen]:
        return self.server.requests("/api/v1/")

    # --- the real JSON shapes -----------------------------------------------------------------

    def file_json(self, version: FakeVersion, file: FakeFile) -> dict:
        sha = (file.sha256 or hashlib.sha256(file.data).hexdigest()).upper()
        query = f"?type={file.type}&format={file.format}&size={file.size}&fp={file.fp}"
        return {
            "id": file.id, "sizeKB": len(file.data) / 1024, "name": file.name,
            "type": file.type, "pickleScanResult": "Success", "pickleScanMessage": "No Pickle "
            "imports", "virusScanResult": "Success", "virusScanMessage": None,
            "scannedAt": "2025-06-01T10:05:00.000Z",
            "metadata": {"format": file.format, "size": file.size, "fp": file.fp},
            "hashes": {"AutoV1": "0F1E2D3C", "AutoV2": sha[:10], "SHA256": sha,
                       "CRC32": f"{zlib.crc32(file.data):08X}", "BLAKE3": "B" * 64,
                       "AutoV3": "A" * 12},
            "primary": file.primary,
            "downloadUrl": f"{self.url}/api/download/models/{version.id}{query}",
        }

    def version_json(self, version_id: int, with_model: bool = True) -> dict:
        version = self.versions[version_id]
        model = self.models[version.model_id]
        archived = model.mode == "Archived"
        doc = {
            "id": version.id, "modelId": model.id, "name": version.name,
            "createdAt": version.published_at, "updatedAt": version.published_at,
            "status": "Published", "publishedAt": version.published_at,
            "trainedWords": version.trained_words, "trainingStatus": None,
            "trainingDetails": None, "baseModel": version.base_model,
            "baseModelType": "Standard", "earlyAccessEndsAt": version.early_access_until,
            "earlyAccessConfig": None, "description": f"<p>{version.name}</p>",
            "uploadType": "Created", "usageControl": "Download",
            "air": f"urn:air:sdxl:lora:civitai:{model.id}@{version.id}",
            "stats": {"downloadCount": 1234, "thumbsUpCount": 56},
            "files": [] if archived else [self.file_json(version, f) for f in version.files],
            "images": [{"width": 832, "height": 1216, "hash": "U9Fi", "type": "image",
                        "metadata": {"hash": "U9Fi", "size": 1000}, "minor": False,
                        "poi": False, "availability": "Public", **image}
                       for image in version.images],
        }
        if not archived:
            doc["downloadUrl"] = f"{self.url}/api/download/models/{version.id}"
        if with_model:
            doc["model"] = {"name": model.name, "type": model.type, "nsfw": model.nsfw,
                            "poi": False, **({"mode": model.mode} if model.mode else {})}
        return doc

    def model_json(self, model_id: int) -> dict:
        model = self.models[model_id]
        return {
            "id": model.id, "name": model.name, "description": "<p>a model</p>",
            "allowNoCredit": True, "allowCommercialUse": ["Image"], "allowDerivatives": True,
            "allowDifferentLicense": True, "type": model.type, "minor": False,
            "poi": False, "nsfw": model.nsfw, "nsfwLevel": 1, "availability": "Public",
            "cosmetic": None, "supportsGeneration": False,
            "stats": {"downloadCount": 1234, "favoriteCount": 0, "thumbsUpCount": 56,
                      "thumbsDownCount": 0, "commentCount": 3, "ratingCount": 0,
                      "rating": 0, "tippedAmountCount": 0},
            "creator": {"username": "maker", "image": None}, "tags": model.tags,
            **({"mode": model.mode} if model.mode else {}),
            "modelVersions": [self.version_json(v, with_model=False) for v in model.versions],
        }

    # --- the routes ---------------------------------------------------------------------------

    def handle(self, seen: Seen) -> Reply:
        for index, (prefix, status) in enumerate(self.queued):
            if seen.path.startswith(prefix):
                del self.queued[index]
                headers = {"Retry-After": "0"} if status == 429 else {}
                return json_reply({"error": "Too many requests" if status == 429 else
                                   "Internal server error"}, status, headers)
        path = seen.path.rstrip("/")
        if path == "/api/v1/models":
            return self._search(seen)
        if path.startswith("/api/v1/models/"):
            model_id = _int(path.rsplit("/", 1)[1])
            if model_id not in self.models:
                return json_reply({"error": f"No model with id {model_id}"}, 404)
            return json_reply(self.model_json(model_id))
        if path == "/api/v1/model-versions/by-hash" and seen.method == "POST":
            return self._by_hashes(seen, limit=100, ids_only=False)
        if path == "/api/v1/model-versions/by-hash/ids" and seen.method == "POST":
            return self._by_hashes(seen, limit=10_000, ids_only=True)
        if path.startswith("/api/v1/model-versions/by-hash/"):
            found = self._versions_with(path.rsplit("/", 1)[1])
            if not found:
                return json_reply({"error": "Model not found"}, 404)
            return json_reply(self.version_json(found[0]))
        if path.startswith("/api/v1/model-versions/"):
            version_id = _int(path.rsplit("/", 1)[1])
            if version_id not in self.versions:
                return json_reply({"error": "Model not found"}, 404)
            return json_reply(self.version_json(version_id))
        if path.startswith("/api/download/models/"):
            return self._download(seen, _int(path.rsplit("/", 1)[1]))
        if path == "/login":
            return Reply(200, {"Content-Type": "text/html; charset=utf-8"},
                         b"<!DOCTYPE html><html><body>Sign in to Civitai</body></html>")
        return json_reply({"error": "Not found"}, 404)

    def _search(self, seen: Seen) -> Reply:
        query = (seen.param("query") or "").lower()
        types = seen.query.get("types", [])
        bases = seen.query.get("baseModels", [])
        ids = {int(i) for i in (seen.param("ids") or "").split(",") if i}
        nsfw = seen.param("nsfw")
        limit = int(seen.param("limit", "20"))
        start = int(seen.param("cursor", "0"))
        matches = []
        for model in sorted(self.models.values(), key=lambda m: m.id):
            newest = self.versions[model.versions[0]] if model.versions else None
            if ids and model.id not in ids:
                continue
            if query and query not in model.name.lower():
                continue
            if types and model.type not in types:
                continue
            if bases and (newest is None or newest.base_model not in bases):
                continue
            if nsfw == "false" and model.nsfw:
                continue
            matches.append(model.id)
        page = matches[start:start + limit]
        metadata = {"pageSize": limit}
        if start + limit < len(matches):
            metadata["nextCursor"] = str(start + limit)
            metadata["nextPage"] = f"{self.url}/api/v1/models?cursor={start + limit}"
        return json_reply({"items": [self.model_json(m) for m in page], "metadata": metadata})

    def _versions_with(self, file_hash: str) -> list[int]:
        wanted = file_hash.upper()
        found = []
        for version in self.versions.values():
            if self.models[version.model_id].mode == "Archived":
                continue
            for file in version.files:
                sha = (file.sha256 or hashlib.sha256(file.data).hexdigest()).upper()
                if wanted in (sha, sha[:10]):
                    found.append(version.id)
        return found

    def _by_hashes(self, seen: Seen, limit: int, ids_only: bool) -> Reply:
        hashes = seen.json()
        if not isinstance(hashes, list) or len(hashes) > limit or any(
                not isinstance(h, str) or len(h) != 64 for h in hashes):
            return json_reply({"error": "Request must include an array of SHA256 Hashes. "
                               "Too many hashes"}, 400)
        if ids_only:
            answer = [{"modelVersionId": v, "hash": h.upper()} for h in hashes
                      for v in self._versions_with(h)]
        else:
            answer = [self.version_json(v) for h in hashes for v in self._versions_with(h)]
        return json_reply(answer)

    def _download(self, seen: Seen, version_id: int) -> Reply:
        version = self.versions.get(version_id)
        if version is None:
            return json_reply({"error": "Model not found"}, 404)
        if self.models[version.model_id].mode == "Archived":
            return json_reply({"error": "Model archived, not available for download"}, 410)
        if version.needs_account and seen.headers.get("authorization") != f"Bearer {self.token}":
            if seen.headers.get("content-type") == "application/json":
                return json_reply({"error": "Unauthorized"}, 401)
            return Reply(307, {"Location": f"{self.url}/login?reason=download-auth"})
        if version.early_access_until:
            if seen.headers.get("content-type") == "application/json":
                return json_reply({"error": "Early Access",
                                   "deadline": version.early_access_until}, 403)
            return Reply(307, {"Location": f"{self.url}/login?reason=early-access"})
        wanted = {key: seen.param(key) for key in ("type", "format", "size", "fp")}
        candidates = [f for f in version.files
                      if all(v is None or str(getattr(f, k)).lower() == v.lower()
                             for k, v in wanted.items())]
        if not candidates:
            return json_reply({"error": "Model file not found"}, 404)
        file = next((f for f in candidates if f.primary), candidates[0])
        return Reply(307, {"Location": self.files.signed_url(self.storage_name(version_id, file))})


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1
