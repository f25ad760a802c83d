"""Verified, resumable downloads of model files (Civitai and plain URLs) into a chosen folder.

A download writes `NAME.partial` beside its target, and `NAME.partial.json` with what makes a
later resume safe: what is being downloaded, the server's validator (a strong ETag, else
Last-Modified), the size and the expected SHA256. A later run, even after a kill -9, asks only
for the rest (`Range` + `If-Range`); a server whose file changed meanwhile answers with the
whole new file, and the download starts over cleanly.

Nothing appears under the final name until the file is complete and its SHA256 (computed from
the bytes on disk, with the other catalog hashes in the same read) matches. What is refused on
the way: an HTML or JSON body (a login or error page), a size far from the one announced, a
file named `.safetensors` whose header is not one, a file the disk has no room for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from catalog.hashes import FileHashes, hash_file
from catalog.remote_http import GuardedClient, describe_transport_error, origin
from catalog.safe_names import bare_url, name_from_disposition, name_from_url, safe_file_name
from catalog.walk import MODEL_SUFFIXES
from mergekit_sd.errors import BadModelFile, Cancelled, UserError, WorkFailed
from mergekit_sd.inspect_view import human_size
from mergekit_sd.io.header import read_header
from mergekit_sd.io.writer import fsync_directory
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# what error pages are served as; a model file is application/octet-stream or similar
REFUSED_CONTENT_TYPES = ("text/html", "application/json", "text/plain", "application/xml",
                         "text/xml", "application/problem+json")
SNIFF_BYTES = 64
SIZE_TOLERANCE = 4096  # Civitai lists sizes in KiB with rounding


class BadDownload(WorkFailed):
    """What arrived is not the file asked for (an error page, a wrong hash); nothing was kept."""


@dataclass
class DownloadRequest:
    url: str
    folder: Path
    key: str  # what is downloaded, stable across runs (a signed URL is not)
    name: str | None = None  # the wanted file name (made safe); None: the server's
    sha256: str | None = None  # lowercase hex; the download is verified against it
    size: int | None = None  # bytes announced before asking (for the space check)
    label: str | None = None  # progress stage; default: the file name
    refusal: Callable[[httpx.Response], Exception] | None = None  # words for a bad status


@dataclass
class Downloaded:
    path: Path
    hashes: FileHashes
    size: int
    fetched: int  # bytes received in this run
    resumed_from: int = 0  # bytes a partial file from an earlier run already had
    restarted: bool = False  # the server's file had changed: started over
    verified: bool = False  # matched the expected SHA256
    already_there: bool = False  # the target already held exactly this file


@dataclass
class _Resume:
    """The `.partial.json` beside a partial file."""
    key: str  # a digest of the request's key: a URL may carry credentials in its query
    validator: str | None
    total: int | None
    sha256: str | None
    name: str | None = None  # the final name, once the server told it

    @classmethod
    def load(cls, path: Path) -> _Resume | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__), encoding="utf-8")
        os.replace(tmp, path)


@dataclass
class _State:
    offset: int = 0
    fetched: int = 0
    resumed_from: int = 0
    restarted: bool = False
    total: int | None = None
    sniffed: bool = False
    name: str | None = None


class Downloader:
    def __init__(self, http: GuardedClient, progress: ProgressCallback = no_progress,
                 cancel: CancelToken | None = None):
        self.http = http
        self.progress = progress
        self.cancel = cancel

    def fetch(self, request: DownloadRequest) -> Downloaded:
        """Download one file (resuming a partial one), verify it and give it its final name."""
        folder = request.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{folder}: cannot create the download folder ({exc.strerror}); "
                            "choose another (`mergekit-sd pull --to FOLDER`)") from None
        planned = _planned_name(request)
        if planned and (there := self._already_there(folder / planned, request)):
            return there
        stem = planned or f"download-{_digest(request.key)[:16]}"
        partial = folder / f"{stem}.partial"
        resume_path = partial.with_name(partial.name + ".json")
        # unbuffered: every byte received is in the file at once, so a kill loses none of them
        handle = os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # the partial file is the other download's: left alone
            raise UserError(f"{partial}: another download of this file is running; wait for "
                            "it to finish") from None
        try:
            return self._fetch_locked(request, handle, partial, resume_path, planned)
        except _AlreadyThere as there:
            _remove(partial, resume_path)
            return there.found
        except BadDownload:
            _remove(partial, resume_path)
            raise
        except BaseException:
            # a refusal before any byte leaves nothing behind; bytes received stay for a resume
            if os.path.exists(partial) and os.path.getsize(partial) == 0:
                _remove(partial, resume_path)
            raise
        finally:
            handle.close()

    def _fetch_locked(self, request: DownloadRequest, handle, partial: Path, resume_path: Path,
                      planned: str | None) -> Downloaded:
        state = _State(name=planned)
        resume = _Resume.load(resume_path)
        if (resume is None or resume.key != _digest(request.key)
                or resume.sha256 != request.sha256 or not resume.validator):
            resume = None
            handle.truncate(0)
        state.offset = state.resumed_from = os.fstat(handle.fileno()).st_size
        if resume is not None:
            state.total, state.name = resume.total, state.name or resume.name
            if request.sha256 and state.offset == resume.total:
                # killed after the last byte, before the rename: the SHA256 decides, and no
                # byte needs asking for again
                return self._finish(request, handle, partial, resume_path, state)
        self._check_space(request.folder, (state.total or request.size or 0) - state.offset)

        retries = restarts = 0
        while True:
            try:
                if self._transfer(request, handle, state, resume, resume_path):
                    break
                restarts += 1  # the partial file was unusable: asked again from the start
                if restarts > 2:
                    raise WorkFailed(f"{bare_url(request.url)}: the server does not answer "
                                     "range requests consistently; try again later")
                resume = None
            except httpx.TransportError as exc:  # dropped or stalled mid-body: resume from here
                retries += 1
                if retries >= self.http.retry.attempts:
                    raise WorkFailed(
                        f"{bare_url(request.url)}: {describe_transport_error(exc)} "
                        f"{retries} times; {human_size(state.offset)} are kept in "
                        f"{partial.name}; run the same command again to resume") from None
                self.http.retry.sleep(self.http.retry.delay(retries - 1))
                resume = _Resume.load(resume_path)
        return self._finish(request, handle, partial, resume_path, state)

    def _transfer(self, request: DownloadRequest, handle, state: _State,
                  resume: _Resume | None, resume_path: Path) -> bool:
        """One request: True when the body arrived whole, False when it must be asked again
        from the start."""
        headers = {"Accept-Encoding": "identity"}
        if state.offset and resume is not None:
            headers["Range"] = f"bytes={state.offset}-"
            headers["If-Range"] = resume.validator
        what = f"the download of {state.name or bare_url(request.url)}"
        response = self.http.request("GET", request.url, what=what, headers=headers,
                                     stream=True)
        try:
            if (response.status_code == 416 and state.offset and resume is not None
                    and _content_range(response.headers.get("Content-Range"))[1] == state.offset):
                # `bytes */TOTAL` with TOTAL the partial's size: it holds the whole file already
                # (If-Range matched, or the answer would be a 200 with the new file)
                state.total = state.offset
                return True
            if not self._accept(request, response, handle, state):
                return False
            validator = _validator(response)
            if validator and (resume is None or resume.validator != validator):
                _Resume(_digest(request.key), validator, state.total, request.sha256,
                        state.name).save(resume_path)
            label = request.label or state.name or "download"
            self.progress(label, state.offset, state.total or 0)
            handle.seek(state.offset)
            for chunk in response.iter_bytes():
                if self.cancel is not None and self.cancel.cancelled:
                    raise Cancelled(f"download of {label} cancelled; "
                                    f"{human_size(state.offset)} are kept, run the same "
                                    "command again to resume")
                handle.write(chunk)
                state.offset += len(chunk)
                state.fetched += len(chunk)
                if not state.sniffed and state.offset >= SNIFF_BYTES:
                    self._sniff(request, handle, state)
                self.progress(label, state.offset, state.total or 0)
            return True
        finally:
            response.close()

    def _accept(self, request: DownloadRequest, response: httpx.Response, handle,
                state: _State) -> bool:
        """Check the response before a byte of its body is kept and set where writing starts;
        False when the partial file proved unusable and the whole file must be asked for."""
        status = response.status_code
        if status == 416 and state.offset:  # asked past the end: the partial is not usable
            _start_over(handle, state)
            return False
        if status not in (200, 206):
            api = self.http.api_origin
            if request.refusal is None:
                raise _plain_refusal(response)
            if api is not None and origin(str(response.url)) != api:
                # the API answered and redirected: the storage host's no is about its signed
                # link (expired, removed), not about the id or the account
                raise _storage_refusal(response, state.name or request.label)
            raise request.refusal(response)
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        name = state.name or bare_url(request.url)
        if kind in REFUSED_CONTENT_TYPES:
            page = "a web page" if "html" in kind else f"a {kind} document"
            raise BadDownload(f"{name}: the server sent {page} instead of the model file (a "
                              "login or error page?); nothing was kept; check the link and "
                              "your token")
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != state.offset:
                _start_over(handle, state)
                return False
            state.total = total
        else:
            if state.offset:  # the file changed on the server (If-Range) or no Range support
                _start_over(handle, state)
            length = response.headers.get("Content-Length")
            state.total = int(length) if length and length.isdigit() else None
        if state.name is None:
            server_name = (name_from_disposition(response.headers.get("Content-Disposition"))
                           or name_from_url(str(response.url)))
            state.name = safe_file_name(server_name)
            if (there := self._already_there(request.folder / state.name, request)):
                raise _AlreadyThere(there)
        if (state.total is not None and request.size is not None
                and abs(state.total - request.size) > SIZE_TOLERANCE + request.size // 100):
            raise BadDownload(f"{state.name}: the server offers {human_size(state.total)} but "
                              f"{human_size(request.size)} were announced (an error page?); "
                              "nothing was kept")
        if state.total is not None:
            self._check_space(request.folder, state.total - state.offset)
        return True

    def _sniff(self, request: DownloadRequest, handle, state: _State) -> None:
        """Look at the first bytes on disk: an error body that slipped past the content type,
        or a `.safetensors` whose header cannot be one, stops the download now."""
        first = os.pread(handle.fileno(), SNIFF_BYTES, 0)
        state.sniffed = True
        problem = _body_problem(first, state.name or "", state.total)
        if problem:
            raise BadDownload(f"{state.name}: {problem}; nothing was kept")

    def _finish(self, request: DownloadRequest, handle, partial: Path, resume_path: Path,
                state: _State) -> Downloaded:
        size = os.fstat(handle.fileno()).st_size
        if state.total is not None and size != state.total:
            raise WorkFailed(f"{state.name}: the server ended the file at {size} of "
                             f"{state.total} bytes; run the same command again to resume")
        if not state.sniffed:
            self._sniff(request, handle, state)
        os.fsync(handle.fileno())
        hashes = hash_file(partial)  # the bytes as they are on disk, in one read
        if request.sha256 and hashes.sha256 != request.sha256:
            raise BadDownload(f"{state.name}: the download does not match its SHA256 (expected "
                              f"{request.sha256[:12]}…, got {hashes.sha256[:12]}…); nothing was "
                              "kept; try again, or report the file to its page if it persists")
        name = _with_model_suffix(state.name or partial.name.removesuffix(".partial"),
                                  os.pread(handle.fileno(), SNIFF_BYTES, 0))
        if name.lower().endswith(SAFETENSORS_SUFFIXES):
            try:
                read_header(partial)
            except BadModelFile as exc:
                raise BadDownload(f"{name}: {_download_problem(exc.problem)}; nothing was "
                                  "kept") from None
        target = request.folder / name
        if (there := self._already_there(target, request, hashes)):
            _remove(partial, resume_path)
            return there
        os.replace(partial, target)
        fsync_directory(request.folder)
        _remove(resume_path)
        return Downloaded(target, hashes, size, state.fetched, state.resumed_from,
                          state.restarted, verified=request.sha256 is not None)

    def _already_there(self, target: Path, request: DownloadRequest,
                       hashes: FileHashes | None = None) -> Downloaded | None:
        """The target name is taken: fine when it holds this very file, refused otherwise."""
        if not target.exists():
            return None
        wanted = request.sha256 or (hashes.sha256 if hashes else None)
        if wanted:
            have = hash_file(target)
            if have.sha256 == wanted:
                return Downloaded(target, have, target.stat().st_size, 0, 0,
                                  verified=request.sha256 is not None, already_there=True)
        if wanted:
            raise UserError(f"{target}: a different file already has this name; move it away "
                            "or pull into another folder (`mergekit-sd pull --to FOLDER`)")
        raise UserError(f"{target}: already exists, and without a SHA256 to compare it cannot "
                        "be told the same; move it away or pull into another folder "
                        "(`mergekit-sd pull --to FOLDER`)")

    @staticmethod
    def _check_space(folder: Path, needed: int) -> None:
        if needed <= 0:
            return
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise UserError(f"{folder}: the download needs {human_size(needed)} but only "
                            f"{human_size(free)} are free; make room or pull into another "
                            "disk (`mergekit-sd pull --to FOLDER`)")


class _AlreadyThere(Exception):
    """The server named the file after all, and that file is already complete here."""

    def __init__(self, found: Downloaded):
        self.found = found


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _planned_name(request: DownloadRequest) -> str | None:
    """The name known before asking: the one requested, or a URL's last part that names a
    model file; otherwise the server's Content-Disposition decides."""
    if request.name:
        return safe_file_name(request.name)
    from_url = name_from_url(request.url)
    if from_url and from_url.lower().endswith(MODEL_SUFFIXES):
        return safe_file_name(from_url)
    return None


def _with_model_suffix(name: str, first: bytes) -> str:
    """A name the catalog and the web UIs will see as a model: a safetensors body under a name
    without a model suffix (`bashrc`, `123`) gets `.safetensors`."""
    if name.lower().endswith(MODEL_SUFFIXES):
        return name
    length = int.from_bytes(first[:8], "little") if len(first) >= 9 else 0
    return f"{name}.safetensors" if first[8:9] == b"{" and length > 1 else name


def _download_problem(problem: str) -> str:
    """A header problem said of the download: the reader words most as what the file is, has
    or declares; the rest (a tensor's entry) follow a plain statement."""
    if problem.startswith(("is ", "has ", "declares ")):
        return f"the download {problem}"
    return f"the download is not a valid safetensors file: {problem}"


def _body_problem(first: bytes, name: str, total: int | None) -> str | None:
    text = first.lstrip()[:16].lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "the server sent a web page instead of the model file (a login or error page?)"
    if name.lower().endswith(SAFETENSORS_SUFFIXES):
        length = int.from_bytes(first[:8], "little") if len(first) >= 8 else 0
        if first[8:9] != b"{" or (total is not None and 8 + length > total):
            kind = "JSON" if text.startswith((b"{", b"[")) else "something else"
            return f"the server sent {kind}, not a safetensors file"
    elif not name.lower().endswith(MODEL_SUFFIXES) and text.startswith((b"{", b"[")):
        return "the server sent a JSON document instead of a model file"
    return None


def _validator(response: httpx.Response) -> str | None:
    """What If-Range may carry: a strong ETag (a weak one is not allowed there), else the date."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None,
            int(total) if total.isdigit() else None)


def _start_over(handle, state: _State) -> None:
    handle.truncate(0)
    state.offset = state.resumed_from = 0
    state.sniffed = False
    state.restarted = True


def _plain_refusal(response: httpx.Response) -> Exception:
    status = response.status_code
    url = bare_url(response.request.url)
    reason = {401: "needs credentials", 403: "refused access", 404: "has no such file",
              410: "removed the file"}.get(status)
    if reason:
        return UserError(f"{url}: the server {reason} (HTTP {status}); check the link")
    return WorkFailed(f"{url}: the server answered HTTP {status}; try again later")


def _storage_refusal(response: httpx.Response, name: str | None) -> Exception:
    host = origin(str(response.url))[1]
    return WorkFailed(f"{name or 'the download'}: the storage host {host} refused the download "
                      f"link (HTTP {response.status_code}); such links expire or move: run the "
                      "same command again for a fresh one")


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


