"""File hashes users and other tools know models by: SHA256 and AUTOMATIC1111's legacy hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mergekit_sd.io.hash_cache import identity, known_sha256, remember_sha256

CHUNK = 8 * 1024 * 1024
# AUTOMATIC1111's legacy hash (Civitai's AutoV1) reads this window of the file
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000


def file_sha256(path: str | os.PathLike, on_bytes=None, cancelled=None) -> str:
    """SHA256 of the whole file, read sequentially; `on_bytes(n)` after each chunk. Remembered
    (`hash_cache`): an unchanged file is read only the first time."""
    known = known_sha256(path)
    if known:
        if on_bytes:
            on_bytes(os.path.getsize(path))
        return known
    before = identity(path)
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if on_bytes:
                on_bytes(n)
            if cancelled and cancelled():
                return digest.hexdigest()  # a partial hash: the caller is stopping
    remember_sha256(path, digest.hexdigest(), before)
    return digest.hexdigest()


def legacy_model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's old 8-character model hash: SHA256 of 64 KiB at offset 1 MiB."""
    with open(Path(path), "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]


class BackgroundSha256:
    """A file's SHA256, computed on a thread while other work goes on (a bake plans and writes
    meanwhile: hashing a 7 GB checkpoint takes four seconds of a core, which the other core
    hides). `result()` waits for it and remembers it (`hash_cache`); `stop()` abandons it."""

    def __init__(self, path: str | os.PathLike, block: int = CHUNK):
        import threading

        self.path, self.block = Path(path), block
        self.before = identity(path)  # for `remember_sha256` once the hash is finished
        self.error: BaseException | None = None
        self._digest = hashlib.sha256()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            buffer = bytearray(self.block)
            view = memoryview(buffer)
            with open(self.path, "rb", buffering=0) as f:
                while not self._stop.is_set() and (n := f.readinto(buffer)):
                    self._digest.update(view[:n])  # releases the GIL for large updates
        except OSError as exc:
            self.error = exc

    def result(self) -> str:
        self._thread.join()
        if self.error is not None:
            raise self.error
        if self._stop.is_set():
            raise RuntimeError("the hash was stopped before it finished")
        sha = self._digest.hexdigest()
        remember_sha256(self.path, sha, self.before)
        return sha

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
