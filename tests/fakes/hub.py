"""What huggingface_hub asks of the Hub, answered as the Hub does: model search, model info
(with `blobs=true`: sizes and LFS data), the tree listing, paths-info, and `resolve`, which
for an LFS file answers 302 to the storage host with X-Repo-Commit, X-Linked-Etag (the SHA256)
and X-Linked-Size, and for a small file answers it directly with its git blob id as ETag.

A gated repository refuses requests without `Authorization: Bearer TOKEN` (X-Error-Code:
GatedRepo); an unknown repository answers RepoNotFound, an unknown file EntryNotFound.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from fakes.files import FileHost
from fakes.loopback import LoopbackServer, Reply, Seen, json_reply

TOKEN = "hf_fake_token_0123456789"
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    id: str
    files: dict[str, bytes]
    commit: str
    gated: bool = False
    downloads: int = 0
    likes: int = 0
    tags: list[str] = field(default_factory=list)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        doc = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
        if self.is_lfs(path):
            doc["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                          "pointerSize": 134}
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:"
                       f"{doc['lfs']['oid']}\nsize {len(data)}\n")
            doc["oid"] = git_blob_id(pointer.encode())
        return doc


class FakeHub:
    def __init__(self, files: FileHost, token: str = TOKEN):
        self.files = files
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.server = LoopbackServer(self.handle)

    @property
    def url(self) -> str:
        return self.server.url

    def add_repo(self, repo_id: str, files: dict[str, bytes], **fields) -> FakeRepo:
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        repo = FakeRepo(repo_id, dict(files), commit, **fields)
        self.repos[repo_id] = repo
        for path, data in files.items():
            if repo.is_lfs(path):
                self.files.put(f"lfs/{hashlib.sha256(data).hexdigest()}", data,
                               disposition_name=path.rsplit("/", 1)[-1])
        return repo

    def handle(self, seen: Seen) -> Reply:
        path = seen.path
        if path == "/api/models":
            return self._search(seen)
        if path.startswith("/api/models/"):
            return self._api(seen, path[len("/api/models/"):].split("/"))
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(seen, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return _error(404, "NotFound", "Not found")

    def _search(self, seen: Seen) -> Reply:
        query = (seen.param("search") or "").lower()
        limit = int(seen.param("limit", "1000"))
        found = sorted((r for r in self.repos.values() if query in r.id.lower()),
                       key=lambda r: -r.downloads)[:limit]
        return json_reply([{"_id": hashlib.md5(r.id.encode()).hexdigest()[:24], "id": r.id,
                            "likes": r.likes, "downloads": r.downloads, "trendingScore": 0,
                            "private": False, "tags": r.tags,
                            "createdAt": "2025-01-01T00:00:00.000Z",
                            "lastModified": "2025-06-01T00:00:00.000Z"} for r in found])

    def _repo(self, seen: Seen, repo_id: str) -> FakeRepo | Reply:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        if repo.gated and seen.headers.get("authorization") != f"Bearer {self.token}":
            return _error(401, "GatedRepo", "Access to this model is restricted")
        return repo

    def _commit(self, repo: FakeRepo, revision: str) -> str | None:
        return repo.commit if revision in ("main", repo.commit) else None

    def _api(self, seen: Seen, parts: list[str]) -> Reply:
        repo = self._repo(seen, "/".join(parts[:2]))
        if isinstance(repo, Reply):
            return repo
        rest = parts[2:]
        revision = "main"
        if rest[:1] == ["revision"]:
            revision, rest = rest[1], rest[2:]
        if not rest:
            if self._commit(repo, revision) is None:
                return _error(404, "RevisionNotFound", "Invalid rev id")
            return json_reply(self._info(repo, seen.param("blobs") in ("True", "true", "1")))
        if rest[0] == "tree":
            if self._commit(repo, rest[1]) is None:
                return _error(404, "RevisionNotFound", "Invalid rev id")
            prefix = "/".join(rest[2:])
            return json_reply(self._tree(repo, prefix, seen.param("recursive") in ("True",
                                                                                  "true")))
        if rest[0] == "paths-info" and seen.method == "POST":
            if self._commit(repo, rest[1]) is None:
                return _error(404, "RevisionNotFound", "Invalid rev id")
            wanted = parse_qs(seen.body.decode()).get("paths", [])
            return json_reply([repo.entry(p) for p in wanted if p in repo.files])
        return _error(404, "NotFound", "Not found")

    def _info(self, repo: FakeRepo, blobs: bool) -> dict:
        siblings = []
        for path in sorted(repo.files):
            sibling = {"rfilename": path}
            if blobs:
                entry = repo.entry(path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"],
                                      "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": hashlib.md5(repo.id.encode()).hexdigest()[:24], "id": repo.id,
                "modelId": repo.id, "author": repo.id.split("/")[0], "sha": repo.commit,
                "lastModified": "2025-06-01T00:00:00.000Z", "private": False,
                "disabled": False, "gated": "auto" if repo.gated else False,
                "downloads": repo.downloads, "likes": repo.likes, "tags": repo.tags,
                "library_name": "diffusers", "siblings": siblings,
                "createdAt": "2025-01-01T00:00:00.000Z",
                "usedStorage": sum(len(d) for d in repo.files.values())}

    def _tree(self, repo: FakeRepo, prefix: str, recursive: bool) -> list[dict]:
        base = f"{prefix}/" if prefix else ""
        entries, folders = [], set()
        for path in sorted(repo.files):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            if recursive:
                parent = path.rsplit("/", 1)[0] if "/" in rest else None
                while parent and parent.startswith(base.rstrip("/")) and parent != prefix:
                    folders.add(parent)
                    parent = parent.rsplit("/", 1)[0] if "/" in parent else None
            entries.append(repo.entry(path))
        return [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f}
                for f in sorted(folders)] + entries

    def _resolve(self, seen: Seen, repo_id: str, revision: str, path: str) -> Reply:
        repo = self._repo(seen, repo_id)
        if isinstance(repo, Reply):
            return repo
        commit = self._commit(repo, revision)
        if commit is None:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        if path not in repo.files:
            return _error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        data = repo.files[path]
        entry = repo.entry(path)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry["oid"]}"'}
        if "lfs" in entry:
            sha = entry["lfs"]["oid"]
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                            "Location": self.files.signed_url(f"lfs/{sha}"),
                            "Content-Type": "text/plain; charset=utf-8"})
            return Reply(302, headers, b"Found. Redirecting")
        headers["Content-Type"] = "text/plain; charset=utf-8"
        return Reply(200, headers, data if seen.method == "GET" else b"", length=len(data))


def _error(status: int, code: str, message: str, extra: dict | None = None) -> Reply:
    return json_reply({"error": message}, status,
                      {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})})
