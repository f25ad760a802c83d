"""Every hash other tools know a model by, from one read of the file.

- SHA256 of the whole file; AutoV2 is its first 10 hex digits (AUTOMATIC1111, Civitai).
- AutoV1: AUTOMATIC1111's legacy hash, SHA256 of the 64 KiB at offset 1 MiB, 8 digits; only for
  files of 2 MiB or more (smaller files would hash a stub).
- AutoV3: SHA256 of a safetensors file's tensor data, the bytes after its header (kohya's
  `sshs_model_hash`); Civitai shows its first 12 digits. Edited metadata leaves it unchanged.
- CRC32 of the whole file, as Civitai lists it.

The two SHA256s run on two threads and the CRC on the reading thread, while the next chunk is
read into a second buffer: hashlib and zlib release the GIL on large buffers, so the extra
hashes cost little wall time over the SHA256 alone on two cores.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.errors import Cancelled
from mergekit_sd.io.hashing import LEGACY_HASH_LENGTH, LEGACY_HASH_OFFSET

CHUNK = 8 * 1024 * 1024
AUTOV1_OFFSET = LEGACY_HASH_OFFSET  # the window legacy_model_hash reads, taken in passing
AUTOV1_LENGTH = LEGACY_HASH_LENGTH
AUTOV1_MIN_SIZE = 2 * 1024 * 1024


def hash_key(st: os.stat_result) -> str:
    """What a file's hashes stay valid for: the same device, inode, size and mtime."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class FileHashes:
    sha256: str  # lowercase hex, like the rest
    crc32: str
    autov1: str | None  # None for files under 2 MiB
    autov3: str | None  # None for files that are not safetensors

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    @property
    def autov3_short(self) -> str | None:
        return self.autov3[:12] if self.autov3 else None


def _data_start(first: bytes, size: int) -> int | None:
    """Where a safetensors file's tensor data begins, or None when the prefix says it is not one."""
    if len(first) < 9:
        return None
    start = 8 + int.from_bytes(first[:8], "little")
    return start if first[8:9] == b"{" and start <= size else None


class _AutoV1:
    """Collects the 64 KiB at offset 1 MiB from whichever chunks hold it."""

    def __init__(self, size: int):
        self.wanted = size >= AUTOV1_MIN_SIZE
        self.parts: list[bytes] = []

    def feed(self, position: int, view: memoryview) -> None:
        if not self.wanted:
            return
        lo = max(AUTOV1_OFFSET, position)
        hi = min(AUTOV1_OFFSET + AUTOV1_LENGTH, position + len(view))
        if lo < hi:
            self.parts.append(bytes(view[lo - position:hi - position]))

    def hexdigest(self) -> str | None:
        return hashlib.sha256(b"".join(self.parts)).hexdigest()[:8] if self.wanted else None


def hash_file(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> FileHashes:
    """All of a file's hashes in one sequential read; `on_bytes(n)` after each chunk, and
    `cancelled()` checked between chunks (raises Cancelled)."""
    path = Path(path)
    full, tensor_data = hashlib.sha256(), hashlib.sha256()
    crc = 0
    buffers = (bytearray(CHUNK), bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(2) as pool:
        size = os.fstat(f.fileno()).st_size
        autov1 = _AutoV1(size)
        data_start: int | None = None
        position, turn, pending = 0, 0, []
        n = f.readinto(buffers[0])
        while n:
            view = memoryview(buffers[turn])[:n]
            if position == 0:
                data_start = _data_start(bytes(view[:9]), size)
            pending = [pool.submit(full.update, view)]
            if data_start is not None and position + n > data_start:
                tensors = view[max(0, data_start - position):]
                pending.append(pool.submit(tensor_data.update, tensors))
            crc = zlib.crc32(view, crc)
            autov1.feed(position, view)
            position += n
            turn ^= 1
            n = f.readinto(buffers[turn])  # the next chunk, while the hashes work on this one
            wait(pending)
            for future in pending:
                future.result()
            if on_bytes:
                on_bytes(len(view))
            if cancelled and cancelled():
                raise Cancelled(f"hashing {path} cancelled")
    return FileHashes(full.hexdigest(), f"{crc:08x}", autov1.hexdigest(),
                      tensor_data.hexdigest() if data_start is not None else None)
