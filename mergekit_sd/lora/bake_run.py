"""Write a planned bake: one streaming pass over the base checkpoint.

The output lays out first the tensors no LoRA names, then the rest, each part in the base's
order. The first part is a plain copy, so it needs neither torch nor the LoRAs: `BakeStream`
writes it on a thread as soon as `prepare_bake` has read the headers, while the main thread
loads the LoRAs (and imports torch, most of a second). `finish` then bakes the rest: the file
is read ahead in large chunks into reused buffers (`io.chunks`), the LoRA deltas are added to
the weights in the read buffer itself (see `_Baker`) by a worker per core (`bake_crew`), and a
writer thread writes each chunk from that buffer. Reading, computing and writing overlap; no
memory is allocated per tensor.
The layout depends only on the inputs, so the same bake always gives the same bytes.
"""

from __future__ import annotations

import math
import sys
import threading
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from mergekit_sd.io.chunks import Chunk, ChunkReader, Piece, landing_in, plan_chunks, write_runs
from mergekit_sd.io.dtypes import torch_dtype
from mergekit_sd.io.hash_cache import known_sha256
from mergekit_sd.io.header import TensorInfo
from mergekit_sd.io.interrupts import interrupts_held
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.saturate import saturating_cast
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
from mergekit_sd.lora.bake import (
    OUTPUT_DTYPES,
    UNKNOWN_SHA256,
    BakePlan,
    apply_loras,
    apply_plain_rows,
    bake_metadata,
    delta_bound,
    exact_in,
    finite_or_clamped,
    narrow_into,
    row_separable,
)
from mergekit_sd.lora.bake_crew import AHEAD, BakeCrew, Task, cores
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress
from mergekit_sd.torch_threads import torch_threads

_FLOATS = ("F64", "F32", "F16", "BF16")
ROW_BLOCK_ELEMENTS = 1 << 20  # a task's share of a large weight (smaller blocks cost more calls)
BUFFERS = AHEAD + 3  # read buffers: being read, baked (AHEAD chunks) and written
COPY_SWITCH_S = 0.0005  # the GIL's switch interval while the untouched tensors are copied


def _out_dtype(plan: BakePlan, dtype: str) -> str:
    wanted = OUTPUT_DTYPES[plan.dtype]
    return wanted if wanted and dtype in _FLOATS else dtype


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
        self._own = threading.local()  # each worker's scratch

    def _applied(self, key: str) -> list | None:
        return self.plan.weights.get(key) or self.plan.biases.get(key)

    def _in_place(self, key: str) -> bool:
        """Whether the LoRAs go into the read buffer itself, with no fp32 work copy."""
        info = self.plan.header.tensors[key]
        if self.specs[key].dtype != info.dtype:
            return False
        dtype = torch_dtype(info.dtype)
        return dtype == self.torch.float32 or (
            not self.plan.biases.get(key)
            and exact_in(self.plan.weights[key], dtype, info.shape[0] if info.shape else 1))

    def scratch(self, tensor):
        """An fp32 work copy of `tensor` in a buffer of the calling thread's, reused for every
        weight (fresh memory per weight costs page faults), made on first need: most bakes
        never need it."""
        own = getattr(self._own, "scratch", None)
        if own is None:
            own = self._own.scratch = self.torch.empty(self.largest, dtype=self.torch.float32)
        return own[:tensor.numel()].view(tensor.shape).copy_(tensor)

    def tasks(self, key: str, info: TensorInfo, raw: memoryview) -> list[Task]:
        """The work on one tensor's bytes: none (written as read), the whole tensor, or, for a
        large weight baked in place whose modules are all plain LoRAs, one task per block of
        rows (so that several cores share it)."""
        apps = self._applied(key)
        if not raw.nbytes or (not apps and self.specs[key].dtype == info.dtype):
            return []
        rows = info.shape[0] if info.shape else 0
        width = math.prod(info.shape[1:])
        step = max(1, ROW_BLOCK_ELEMENTS // max(1, width))
        if not apps or self.plan.biases.get(key) or rows <= step or not self._in_place(key) \
                or not row_separable(apps):
            return [lambda: self(key, info, raw)]
        tensor = self.torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(info.shape)
        bound = delta_bound(apps)
        return [lambda first=first: self._rows(key, tensor, apps, first, min(first + step, rows),
                                               bound)
                for first in range(0, rows, step)]

    def _rows(self, key: str, tensor, apps: list, first: int, end: int, bound: float) -> None:
        """Bake rows [first, end) of a weight in place and check them while they are in the
        cache."""
        apply_plain_rows(tensor, apps, first, end)
        finite_or_clamped(tensor[first:end], apps, key, self.plan.clamped, bound)

    def __call__(self, key: str, info: TensorInfo, raw: memoryview):
        torch, spec = self.torch, self.specs[key]
        apps = self._applied(key)
        if not raw.nbytes or (not apps and spec.dtype == info.dtype):
            return raw
        tensor = torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(info.shape)
        clamped = self.plan.clamped
        if apps:
            bias = not self.plan.weights.get(key)
            bound = math.inf if bias else delta_bound(apps)
            if self._in_place(key):
                apply_loras(tensor, apps, bias=bias)
                finite_or_clamped(tensor, apps, key, clamped, bound)
                return raw
            work = self.scratch(tensor)
            apply_loras(work, apps, bias=bias)
            finite_or_clamped(work, apps, key, clamped, bound)
            if spec.dtype == info.dtype:
                narrow_into(tensor, work, key, clamped)  # rounded once, back into the buffer
                return raw
            tensor = work
        # a narrowing cast clamps what lies beyond the output dtype's range (never ±inf)
        cast = saturating_cast(tensor, torch_dtype(spec.dtype), key, clamped)
        return cast.clone() if cast is tensor else cast


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


_switch_lock = threading.Lock()
_switch_users = 0
_switch_own = 0.0  # the process's interval, put back when the last user is done


@contextmanager
def _short_switch_interval():
    """The GIL's switch interval at most `COPY_SWITCH_S` while any copy of a bake in this
    process runs (counted, so that bakes that overlap leave the process's own value behind)."""
    global _switch_users, _switch_own
    with _switch_lock:
        if not _switch_users:
            _switch_own = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_own, COPY_SWITCH_S))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if not _switch_users:
                sys.setswitchinterval(_switch_own)


def _one_torch_thread():
    """torch computing on the calling thread alone: the crew's workers are the parallelism,
    one per core, and torch's own threads beside them would fight them for every core."""
    return torch_threads(1)


class BakeStream:
    """The output file of a prepared bake (`prepare_bake`), begun at once: the tensors no LoRA
    names are copied on a thread while the caller loads the LoRAs (`load_loras`); `finish`
    bakes the rest and renames the file into place. Use as a context manager: leaving it
    without `finish` (an error, Ctrl-C) stops the copy and deletes the partial file."""

    def __init__(self, plan: BakePlan):
        infos = plan.header.tensors
        in_file = sorted(infos, key=lambda k: infos[k].start)
        untouched = [k for k in in_file if k not in plan.touched]
        self.order = untouched + [k for k in in_file if k in plan.touched]
        specs = [TensorSpec(k, _out_dtype(plan, infos[k].dtype), infos[k].shape)
                 for k in self.order]
        self.plan = plan
        self._reader = SafetensorsReader(plan.base, plan.header)
        try:
            self._writer = StreamingWriter(plan.output, specs,
                                           bake_metadata(plan, UNKNOWN_SHA256))
        except BaseException:
            self._reader.close()
            raise
        # a copy only while no tensor changes dtype (that takes torch)
        self._copied = untouched if OUTPUT_DTYPES[plan.dtype] is None else []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy, name="copy-untouched", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        # The main thread spends this copy importing torch: Python code that holds the GIL,
        # which this thread, the read-ahead and the writer each wait for at every hand-over
        # of a chunk, up to the switch interval each time (5 ms by default). In timelines of
        # an SDXL bake that kept the copy of its 1.1 GB of untouched tensors running about 0.1 s
        # past the import; a shorter interval while it runs lets it keep up with the disk.
        try:
            with _short_switch_interval():
                chunks = plan_chunks(self.plan.header, self._copied, set())
                with ChunkReader(self._reader, chunks,
                                 landing=landing_in(self._writer)) as reading:
                    for chunk in reading:
                        if self._stop.is_set():
                            return
                        write_runs(self._writer, chunk, chunk.pieces)
                        reading.release(chunk)
        except BaseException as exc:  # raised by `finish`
            traceback.clear_frames(exc.__traceback__)
            self._error = exc

    def finish(self, progress: ProgressCallback = no_progress,
               cancel: CancelToken | None = None) -> Path:
        """Bake the rest (the LoRAs loaded), write the provenance and commit; the path."""
        cancel = cancel or CancelToken()
        self._thread.join()
        if self._error is not None:
            raise self._error
        plan, writer, infos = self.plan, self._writer, self.plan.header.tensors
        copied_changed = (plan.weights.keys() | plan.biases.keys()) & set(self._copied)
        if copied_changed:  # `touched` must cover every weight a module changes
            raise RuntimeError(f"{len(copied_changed)} weights the LoRAs change were copied "
                               f"unchanged, e.g. {min(copied_changed)}")
        rest = self.order[len(self._copied):]
        progress("baking", len(self._copied), len(self.order))
        changed = {k for k in rest if k in plan.weights or k in plan.biases
                   or writer.specs[k].dtype != infos[k].dtype}
        with _one_torch_thread():
            bake = _Baker(plan, writer.specs, changed)
            chunks = plan_chunks(plan.header, rest, changed)
            with ChunkReader(self._reader, chunks, landing=landing_in(writer),
                             buffers=BUFFERS) as chunk_reader, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as write_thread:
                _bake_chunks(chunk_reader, bake, writer, write_thread, infos,
                             len(self._copied), progress, cancel)
        known = plan.known_sha256 or known_sha256(plan.base)
        sha = known.lower() if known else plan.base_hash.result()
        writer.rewrite_metadata(bake_metadata(plan, sha))
        written = writer.commit()
        self._reader.close()
        return written

    def abort(self) -> None:
        """Stop the copy and delete the partial file (a second Ctrl-C waits until it is gone:
        the copy thread may take a moment to finish its chunk)."""
        with interrupts_held():
            self._stop.set()
            self._thread.join()
            self.plan.stop()
            self._writer.abort()
            self._reader.close()

    def __enter__(self) -> BakeStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def run_bake(plan: BakePlan, progress: ProgressCallback = no_progress,
             cancel: CancelToken | None = None) -> Path:
    """Write the baked checkpoint of a whole plan (atomically) and return its path."""
    with BakeStream(plan) as stream:
        return stream.finish(progress, cancel)


def _bake_chunks(chunk_reader: ChunkReader, bake: _Baker, writer: StreamingWriter,
                 write_thread: ThreadPoolExecutor, infos: dict[str, TensorInfo], done: int,
                 progress: ProgressCallback, cancel: CancelToken) -> None:
    """Bake the chunks on a crew of workers (`bake_crew`) and write each as it is done, in
    order, on `write_thread`."""
    import torch

    total = len(infos)
    as_read = 0  # tensors that end in a chunk and need no work
    writes: deque[Future] = deque()

    def tasks_of(chunk: Chunk) -> list[list[Task]]:
        nonlocal as_read
        tasks = [bake.tasks(p.key, infos[p.key], chunk.bytes_of(p)) for p in chunk.pieces]
        as_read += sum(1 for p, t in zip(chunk.pieces, tasks, strict=True)
                       if not t and p.offset + p.size == infos[p.key].nbytes)
        return tasks

    def hand_on(chunk: Chunk, results: list) -> None:
        writes.append(write_thread.submit(_write_chunk, writer, list(zip(
            chunk.pieces, results, strict=True)), chunk_reader.release, chunk))

    def tick() -> None:
        while writes and writes[0].done():
            writes.popleft().result()  # raises what a write raised
        progress("baking", done + as_read + crew.tensors_done, total)

    with BakeCrew(cores(), setup=lambda: torch.set_num_threads(1)) as crew:
        crew.run(chunk_reader, tasks_of, hand_on, bake.plan.done_with, cancel, tick)
    while writes:
        writes.popleft().result()
    progress("baking", total, total)
