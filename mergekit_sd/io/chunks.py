"""Read a safetensors file's data front to back in large chunks, ahead of the caller, on a
thread, into a few buffers that are reused.

A streaming pass that touches most of a file (bake, convert) spends its time in memory traffic:
a fresh buffer per tensor costs a page fault per 4 KiB on top of the copy, and reading one
tensor at a time on the compute thread leaves the disk idle while it computes. Chunks fix both:
a chunk is a run of the file's bytes up to `size` long, cut between tensors or inside a tensor
the caller only copies, but never inside a tensor the caller asked to see `whole` (one that is
larger than `size` gets a chunk, and a buffer, of its own).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from mergekit_sd.io.header import SafetensorsHeader
from mergekit_sd.io.reader import SafetensorsReader

CHUNK_BYTES = 16 << 20
BUFFERS = 4  # in flight at once: being read, computed on, written and hashed


@dataclass(frozen=True, slots=True)
class Piece:
    key: str
    offset: int  # bytes into the tensor
    size: int
    at: int  # bytes into the chunk


@dataclass(slots=True)
class Chunk:
    index: int
    start: int  # file offset of its first byte
    size: int
    pieces: list[Piece]
    view: memoryview | None = None
    _buffer: bytearray | None = None
    _pooled: bytearray | None = None  # the pool's buffer this chunk holds

    def bytes_of(self, piece: Piece) -> memoryview:
        return self.view[piece.at:piece.at + piece.size]


def plan_chunks(header: SafetensorsHeader, order: list[str], whole: set[str],
                size: int = CHUNK_BYTES) -> list[Chunk]:
    """Chunks over the tensors in `order` (file order); bytes between tensors are skipped."""
    chunks: list[Chunk] = []
    current: Chunk | None = None

    def start_at(offset: int) -> Chunk:
        chunk = Chunk(len(chunks), offset, 0, [])
        chunks.append(chunk)
        return chunk

    for key in order:
        info = header.tensors[key]
        if info.nbytes == 0:
            (current or start_at(info.start)).pieces.append(Piece(key, 0, 0, 0))
            continue
        if key in whole:
            fits = current is not None and current.start + current.size == info.start and \
                current.size + info.nbytes <= size
            if not fits:
                current = start_at(info.start)
            current.pieces.append(Piece(key, 0, info.nbytes, current.size))
            current.size += info.nbytes
            continue
        done = 0
        while done < info.nbytes:
            if current is None or current.size >= size or \
                    current.start + current.size != info.start + done:
                current = start_at(info.start + done)
            take = min(info.nbytes - done, size - current.size)
            current.pieces.append(Piece(key, done, take, current.size))
            current.size += take
            done += take
    return chunks


class ChunkReader:
    """Iterate over `chunks` filled with their bytes; `release(chunk)` (from any thread) when
    done with one, so its buffer can take a later chunk. Use as a context manager.

    With a `digest` (hashlib), the read-ahead thread also feeds it every chunk's bytes from
    file offset `digest_from` on, in order, before handing the chunk over: the consumer may
    then change a chunk in place."""

    def __init__(self, reader: SafetensorsReader, chunks: list[Chunk], size: int = CHUNK_BYTES,
                 buffers: int = BUFFERS, digest=None, digest_from: int = 0):
        self._reader, self._chunks, self._size = reader, chunks, size
        self._digest, self._digest_from = digest, digest_from
        self._free: queue.Queue = queue.Queue()
        for _ in range(min(buffers, len(chunks))):
            self._free.put(bytearray(size))
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="read-ahead", daemon=True)

    def _buffer_for(self, chunk: Chunk) -> bytearray | None:
        """A pooled buffer, waiting for one to be released. A tensor larger than a chunk gets
        a buffer of its own, but still takes a pooled one out while it is in flight, so that
        no more than `buffers` chunks are ever held."""
        while not self._stop.is_set():
            try:
                buffer = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            chunk._pooled = buffer
            return buffer if chunk.size <= len(buffer) else bytearray(chunk.size)
        return None

    def _fill(self) -> None:
        try:
            for chunk in self._chunks:
                buffer = self._buffer_for(chunk)
                if buffer is None:
                    return
                chunk._buffer = buffer
                chunk.view = memoryview(buffer)[:chunk.size]
                self._reader.read_at(chunk.start, chunk.view)
                skip = self._digest_from - chunk.start
                if self._digest is not None and skip < chunk.size:
                    self._digest.update(chunk.view[max(skip, 0):])
                self._ready.put(chunk)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._ready.put(exc)

    def __iter__(self):
        for _ in self._chunks:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, chunk: Chunk) -> None:
        pooled, chunk._pooled, chunk._buffer, chunk.view = chunk._pooled, None, None, None
        if pooled is not None:
            self._free.put(pooled)

    def __enter__(self) -> ChunkReader:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
