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
