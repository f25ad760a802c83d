"""A storage host, as Civitai's signed URLs and the Hub's LFS CDN lead to: files by name with
strong ETags, Range and If-Range, Content-Disposition, and misbehaviour on demand."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from fakes.loopback import LoopbackServer, Reply, Seen


@dataclass
class Blob:
    data: bytes
    etag: str
    content_type: str = "application/octet-stream"
    disposition: str | None = None


class FileHost:
    def __init__(self):
        self.blobs: dict[str, Blob] = {}
        self.slow: dict[str, float] = {}  # name -> seconds between 64 KiB chunks
        self.next_get: dict[str, dict] = {}  # name -> Reply fields for its next GET only
        self.server = LoopbackServer(self.handle)

    @property
    def url(self) -> str:
        return self.server.url

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream",
            disposition_name: str | None = None) -> None:
        """Store (or replace: a new ETag) a file."""
        etag = f'"{hashlib.md5(data).hexdigest()}"'  # what S3-like stores use for one part
        disposition = (f'attachment; filename="{disposition_name}"' if disposition_name
                       else None)
        self.blobs[name] = Blob(data, etag, content_type, disposition)

    def signed_url(self, name: str) -> str:
        """A fresh URL each time, like a storage host's signed links."""
        return f"{self.url}/files/{quote(name)}?X-Signature={secrets.token_hex(8)}&X-Expires=600"

    def sent(self, name: str) -> int:
        """Body bytes served for `name` so far, over every request."""
        return sum(s.sent for s in self.server.requests(f"/files/{name}", "GET"))

    def handle(self, seen: Seen) -> Reply:
        name = seen.path.removeprefix("/files/")
        blob = self.blobs.get(name)
        if blob is None:
            return Reply(404, {"Content-Type": "application/xml"},
                         b"<Error><Code>NoSuchKey</Code></Error>")
        headers = {"Content-Type": blob.content_type, "ETag": blob.etag,
                   "Accept-Ranges": "bytes", "Last-Modified": "Tue, 01 Jul 2025 10:00:00 GMT"}
        if blob.disposition:
            headers["Content-Disposition"] = blob.disposition
        data, status = blob.data, 200
        wanted = seen.headers.get("range", "")
        if_range = seen.headers.get("if-range")
        if wanted.startswith("bytes=") and (if_range is None or if_range == blob.etag):
            start = int(wanted[6:].split("-")[0])
            if start >= len(data):
                return Reply(416, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        extra = self.next_get.pop(name, {}) if seen.method == "GET" else {}
        return Reply(status, headers, data, delay=self.slow.get(name, 0.0), **extra)
