"""Write a planned bake: one streaming pass over the base checkpoint, on three threads.

The file is read ahead in large chunks into reused buffers (`io.chunks`) by a thread that also
feeds the base's SHA256 (for the provenance) from the very same bytes, so the base is read
exactly once. This thread then adds the LoRA deltas to the weights they change, in the read
buffer itself (see `_Baker`), and a writer thread writes each chunk from that buffer. Reading
and hashing, computing, and writing overlap; no memory is allocated per tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from mergekit_sd.io.chunks import Chunk, ChunkReader, Piece, landing_in, plan_chunks, write_runs
from mergekit_sd.io.dtypes import torch_dtype
from mergekit_sd.io.hash_cache import identity, known_sha256, remember_sha256
from mergekit_sd.io.hashing import file_sha256
from mergekit_sd.io.header import SafetensorsHeader, TensorInfo
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
from mergekit_sd.lora.bake import OUTPUT_DTYPES, BakePlan, apply_loras, bake_metadata, exact_in
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress

_FLOATS = ("F64", "F32", "F16", "BF16")
WRITE_BEHIND = 2  # chunks handed to the writer and not yet written


def _out_dtype(plan: BakePlan, dtype: str) -> str:
    wanted = OUTPUT_DTYPES[plan.dtype]
    return wanted if wanted and dtype in _FLOATS else dtype


def _contiguous(header: SafetensorsHeader, order: list[str]) -> bool:
    """Whether the tensors' bytes, in file order, are the whole file after the header (then
    hashing them as they stream by gives the file's SHA256)."""
    position = header.data_start
    for key in order:
        info = header.tensors[key]
        if info.start != position:
            return False
        position = info.end
    return position == header.file_size


class _Baker:
    """Bakes one tensor's bytes as they sit in the read buffer: in place when the output keeps
    the input's dtype (the writer then writes the buffer as it is), else into a new tensor of
    the output dtype."""

    def __init__(self, plan: BakePlan, specs: dict[str, TensorSpec], changed: set[str]):
        import torch

        self.plan, self.specs, self.torch = plan, specs, torch
        infos = plan.header.tensors
        self.largest = max((math.prod(infos[k].shape) for k in changed
                            if self._applied(k) and not self._in_place(k)), default=0)
        self._scratch = None

    def _applied(self, key: str) -> list | None:
        return self.plan.weights.get(key) or self.plan.biases.get(key)

    def _in_place(self, key: str) -> bool:
        """Whether the LoRAs go into the read buffer itself, with no fp32 work copy."""
        info = self.plan.header.tensors[key]
        if self.specs[key].dtype != info.dtype:
            return False
        dtype = torch_dtype(info.dtype)
        return dtype == self.torch.float32 or (
            not self.plan.biases.get(key) and exact_in(self.plan.weights[key], dtype))

    def scratch(self, tensor):
        """An fp32 work copy of `tensor` in one buffer reused for every weight (fresh memory
        per weight costs page faults), made on first need: most bakes never need it."""
        if self._scratch is None:
            self._scratch = self.torch.empty(self.largest, dtype=self.torch.float32)
        return self._scratch[:tensor.numel()].view(tensor.shape).copy_(tensor)

    def __call__(self, key: str, info: TensorInfo, raw: memoryview):
        torch, spec = self.torch, self.specs[key]
        apps = self._applied(key)
        if not raw.nbytes or (not apps and spec.dtype == info.dtype):
            return raw
        tensor = torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(info.shape)
        if apps:
            bias = not self.plan.weights.get(key)
            if self._in_place(key):
                apply_loras(tensor, apps, bias=bias)
                return raw
            work = self.scratch(tensor)
            apply_loras(work, apps, bias=bias)
            if spec.dtype == info.dtype:
                tensor.copy_(work)  # rounded once, back into the buffer
                return raw
            tensor = work
        return tensor.to(torch_dtype(spec.dtype), copy=True)


class _BaseHash:
    """The base's SHA256 for the provenance: known already, or finished from the bytes the
    bake streams, after what planning's hash-ahead thread (`PrefixHasher`) covered."""

    def __init__(self, plan: BakePlan, known: str | None, contiguous: bool):
        self.plan, self.digest, self.position = plan, None, 0
        self.before = identity(plan.base)
        if plan.hash_ahead is not None:
            state, covered = plan.hash_ahead.stop()
            self.before = plan.hash_ahead.before
            if covered == plan.header.file_size or (contiguous and not known):
                self.digest, self.position = state, covered
        elif contiguous and not known:
            self.digest = hashlib.sha256()

    def rest_from(self, reader: SafetensorsReader):
        """(digest, file offset) for the chunk reader to go on from; None when complete."""
        if self.digest is None or self.position == self.plan.header.file_size:
            return None, 0
        data_start = self.plan.header.data_start
        if self.position < data_start:  # the header, which no chunk holds
            head = bytearray(data_start - self.position)
            reader.read_at(self.position, head)
            self.digest.update(head)
            self.position = data_start
        return self.digest, self.position

    def result(self) -> str:
        if self.digest is None:  # tensors not laid end to end: hash the file as it is
            return file_sha256(self.plan.base)
        sha = self.digest.hexdigest()
        remember_sha256(self.plan.base, sha, self.before)
        return sha


def _write_chunk(writer: StreamingWriter, results: list[tuple[Piece, object]], release,
                 chunk: Chunk) -> None:
    """Write a baked chunk: the pieces left in its buffer in runs (`write_runs`), tensors of
    another dtype one by one."""
    in_buffer: list[Piece] = []
    for piece, result in results:
        if isinstance(result, memoryview):
            in_buffer.append(piece)
            continue
        write_runs(writer, chunk, in_buffer)
        in_buffer.clear()
        writer.write(piece.key, result)
    write_runs(writer, chunk, in_buffer)
    results.clear()
    release(chunk)


@contextmanager
def _one_core_spared():
    """torch's compute threads, one fewer while the hashing, reading and writing threads run
    beside them: on a small machine they would otherwise fight over every core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_bake(plan: BakePlan, progress: ProgressCallback = no_progress,
             cancel: CancelToken | None = None) -> Path:
    """Write the baked checkpoint (atomically) and return its path."""
    with _one_core_spared():
        return _stream(plan, progress, cancel or CancelToken())


def _stream(plan: BakePlan, progress: ProgressCallback, cancel: CancelToken) -> Path:
    infos = plan.header.tensors
    order = sorted(infos, key=lambda k: infos[k].start)  # file order: the hash streams along
    # the output keeps the base's data order, so the writer gets every byte in sequence
    specs = [TensorSpec(k, _out_dtype(plan, infos[k].dtype), infos[k].shape) for k in order]
    changed = {s.name for s in specs if s.name in plan.weights or s.name in plan.biases
               or s.dtype != infos[s.name].dtype}
    known = plan.known_sha256 or known_sha256(plan.base)
    hashing = _BaseHash(plan, known, _contiguous(plan.header, order))
    chunks = plan_chunks(plan.header, order, changed)
    with SafetensorsReader(plan.base, plan.header) as reader, \
            StreamingWriter(plan.output, specs, bake_metadata(plan, "~" * 64)) as writer:
        bake = _Baker(plan, writer.specs, changed)
        digest, start = hashing.rest_from(reader)
        with ChunkReader(reader, chunks, digest=digest, digest_from=start,
                         landing=landing_in(writer)) as chunk_reader, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as write_thread:
            _bake_chunks(chunk_reader, bake, writer, write_thread, infos, progress, cancel)
        sha = known.lower() if known else hashing.result()
        writer.rewrite_metadata(bake_metadata(plan, sha))
    return plan.output


def _bake_chunks(chunk_reader: ChunkReader, bake: _Baker, writer: StreamingWriter,
                 write_thread: ThreadPoolExecutor, infos: dict[str, TensorInfo],
                 progress: ProgressCallback, cancel: CancelToken) -> None:
    done, total = 0, len(infos)
    writes: deque[Future] = deque()
    for chunk in chunk_reader:
        results = []
        for piece in chunk.pieces:
            cancel.raise_if_cancelled()
            info = infos[piece.key]
            results.append((piece, bake(piece.key, info, chunk.bytes_of(piece))))
            if piece.offset + piece.size == info.nbytes:
                done += 1
                progress("baking", done, total)
        writes.append(write_thread.submit(_write_chunk, writer, results, chunk_reader.release,
                                          chunk))
        while len(writes) > WRITE_BEHIND:
            writes.popleft().result()
    while writes:
        writes.popleft().result()
