"""Read a safetensors file's tensors, in the order they will be written, in large chunks ahead
of the caller, on a thread, into a few buffers that are reused.

A streaming pass that touches most of a file (bake, convert) spends its time in memory traffic:
a fresh buffer per tensor costs a page fault per 4 KiB on top of the copy, and reading one
tensor at a time on the compute thread leaves the disk idle while it computes. Chunks fix both:
a chunk is up to `size` bytes of consecutive tensors of that order, gathered from wherever they
lie in the file, cut between tensors or inside a tensor the caller only copies, but never
inside a tensor the caller asked to see `whole` (one that is larger than `size` gets a chunk of
its own, and a pooled buffer grown to fit it).

Each chunk's bytes sit in their page-aligned buffer at the offset within a block at which they
will be written (`landing`), so that the writer can send them to disk with O_DIRECT straight
from there (`io.direct`) instead of copying them into its stages.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mergekit_sd.io.buffers import page_buffer
from mergekit_sd.io.direct import BLOCK
from mergekit_sd.io.header import SafetensorsHeader
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.writer import StreamingWriter

CHUNK_BYTES = 16 << 20
BUFFERS = 4  # in flight at once: being read, computed on and written


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
    # (file offset, bytes into the chunk, length) of each run of the file it holds
    ranges: list[tuple[int, int, int]] = field(default_factory=list)
    view: memoryview | None = None
    _buffer: mmap.mmap | None = None  # the pool's buffer this chunk holds

    def bytes_of(self, piece: Piece) -> memoryview:
        return self.view[piece.at:piece.at + piece.size]

    def add(self, key: str, offset: int, size: int, file_offset: int) -> None:
        self.pieces.append(Piece(key, offset, size, self.size))
        if size:
            last = self.ranges[-1] if self.ranges else None
            if last and last[0] + last[2] == file_offset:
                self.ranges[-1] = (last[0], last[1], last[2] + size)
            else:
                self.ranges.append((file_offset, self.size, size))
        self.size += size


def plan_chunks(header: SafetensorsHeader, order: list[str], whole: set[str],
                size: int = CHUNK_BYTES) -> list[Chunk]:
    """Chunks over the tensors in `order`, which fill each chunk in that order (the order they
    will be written in) wherever they lie in the file: a chunk may gather several runs of it,
    so that small tensors scattered between others do not each cost a chunk."""
    chunks: list[Chunk] = []
    current: Chunk | None = None

    def start_at(offset: int) -> Chunk:
        chunk = Chunk(len(chunks), offset, 0, [])
        chunks.append(chunk)
        return chunk

    for key in order:
        info = header.tensors[key]
        if key in whole or info.nbytes == 0:
            if current is None or (info.nbytes and current.size + info.nbytes > size):
                current = start_at(info.start)
            current.add(key, 0, info.nbytes, info.start)
            continue
        done = 0
        while done < info.nbytes:
            if current is None or current.size >= size:
                current = start_at(info.start + done)
            take = min(info.nbytes - done, size - current.size)
            current.add(key, done, take, info.start + done)
            done += take
    return chunks


class ChunkReader:
    """Iterate over `chunks` filled with their bytes; `release(chunk)` (from any thread) when
    done with one, so its buffer can take a later chunk. Use as a context manager.

    `landing(chunk)` is the file offset the chunk's first byte will be written at (by default,
    where it was read from)."""

    def __init__(self, reader: SafetensorsReader, chunks: list[Chunk], size: int = CHUNK_BYTES,
                 buffers: int = BUFFERS, landing: Callable[[Chunk], int] | None = None):
        self._reader, self._chunks, self._size = reader, chunks, size
        self._landing = landing or (lambda chunk: chunk.start)
        self._free: queue.Queue = queue.Queue()
        # Sized at the outset for every chunk up to twice `size` (whole tensors a little
        # larger than a chunk are common: an SDXL bake's 25 MB weights): a buffer replaced by
        # a larger one is fresh memory the kernel zeroes page by page, about a tenth of a
        # core-second per 100 MB here. Only rarer, larger tensors grow a buffer.
        first = max((c.size for c in chunks if c.size <= 2 * size), default=size)
        for _ in range(min(buffers, len(chunks))):
            self._free.put(page_buffer(max(size, first) + BLOCK))  # room to shift by a block
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="read-ahead", daemon=True)

    def _buffer_for(self, chunk: Chunk) -> mmap.mmap | None:
        """A pooled buffer, waiting for one to be released, so that no more than `buffers`
        chunks are ever held. One too small for a tensor larger than a chunk is replaced by a
        larger one, which stays in the pool: fresh memory for every large tensor would cost a
        page fault per 4 KiB of it."""
        while not self._stop.is_set():
            try:
                buffer = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            if len(buffer) < chunk.size + BLOCK:
                buffer = page_buffer(chunk.size + BLOCK)  # the smaller one goes when unused
            return buffer
        return None

    def _fill(self) -> None:
        try:
            for chunk in self._chunks:
                buffer = self._buffer_for(chunk)
                if buffer is None:
                    return
                chunk._buffer = buffer
                shift = self._landing(chunk) % BLOCK
                chunk.view = memoryview(buffer)[shift:shift + chunk.size]
                for offset, at, length in chunk.ranges:
                    self._reader.read_at(offset, chunk.view[at:at + length])
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
        buffer, chunk._buffer, chunk.view = chunk._buffer, None, None
        if buffer is not None:
            self._free.put(buffer)

    def __enter__(self) -> ChunkReader:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def landing_in(writer: StreamingWriter) -> Callable[[Chunk], int]:
    """`ChunkReader`'s `landing` for chunks written to `writer` as they were read."""
    return lambda chunk: writer.file_offset(chunk.pieces[0].key, chunk.pieces[0].offset)


def write_runs(writer: StreamingWriter, chunk: Chunk, pieces: list[Piece]) -> None:
    """Write `pieces` of `chunk` from its buffer, one write per run of pieces that lie end to
    end both there and in the output file (a chunk copied whole is one write)."""
    run: list[Piece] = []

    def flush() -> None:
        if run:
            start, end = run[0].at, run[-1].at + run[-1].size
            writer.write_run([(p.key, p.offset, p.size) for p in run], chunk.view[start:end])
            run.clear()

    for piece in pieces:
        if run and not (piece.at == run[-1].at + run[-1].size and
                        writer.file_offset(piece.key, piece.offset) ==
                        writer.file_offset(run[-1].key, run[-1].offset) + run[-1].size):
            flush()
        run.append(piece)
    flush()
