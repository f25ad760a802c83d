"""A bake's arithmetic on every core, in step with reading and writing.

Why: streamed from a warm page cache, a checkpoint's LoRA products (an fp16 matrix product per
module, W += s·up@down) take one core longer than the disk takes to write the file
(bench/bake.py), so one computing thread leaves the disk waiting. `BakeCrew` runs that
arithmetic on worker threads, one per core. Each chunk's work is cut into tasks: a tensor, or a
block of rows of a large weight whose modules are all plain LoRAs, so that one large weight
does not keep the other cores waiting. The workers take tasks from one queue, on into the next
chunk while another worker finishes a chunk's last task, and a chunk goes to the writer when
its last task is done and every chunk before it has gone, so the file is written in order.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mergekit_sd.io.chunks import Chunk
from mergekit_sd.progress import CancelToken

AHEAD = 3  # chunks being baked at once (each holds a read buffer)
POLL_S = 0.1  # how often a wait looks for a worker's error or a cancel


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


Task = Callable[[], object]


@dataclass(slots=True)
class _Job:
    """A chunk being baked: what each of its pieces becomes, and how many tasks are left."""

    chunk: Chunk
    results: list
    left: int = 0


class BakeCrew:
    """Worker threads that bake chunks; `run` feeds them. Use as a context manager: leaving it
    stops the workers (a task under way finishes, the rest are dropped)."""

    def __init__(self, workers: int, setup: Callable[[], None] = lambda: None,
                 ahead: int = AHEAD):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._room = threading.Semaphore(ahead)  # released as each chunk is handed on
        self._news: queue.SimpleQueue = queue.SimpleQueue()
        self._started = 0  # chunks started
        self._finished: dict[int, _Job] = {}  # done, waiting for a chunk before them
        self._next = 0  # index of the next chunk to hand on
        self._parts_left: dict[str, int] = {}  # tasks left of each tensor under way
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.tensors_done = 0
        self._hand_on: Callable[[Chunk, list], None] = lambda chunk, results: None
        self._finish_tensor: Callable[[str], None] = lambda key: None
        self._threads = [threading.Thread(target=self._work, args=(setup,), name=f"bake-{i}",
                                          daemon=True) for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def run(self, chunks: Iterable[Chunk], tasks_of: Callable[[Chunk], list[list[Task]]],
            hand_on: Callable[[Chunk, list], None], finish_tensor: Callable[[str], None],
            cancel: CancelToken, tick: Callable[[], None]) -> None:
        """Bake every chunk. `tasks_of(chunk)` gives each piece's tasks: none (the piece is
        written as read), one (its result is the piece's), or several (blocks of a weight
        baked in place). `hand_on(chunk, results)` is called for each chunk in order, from a
        worker, and `finish_tensor(key)` once a tensor's last task is done. `tick()` is called
        on this thread, for progress, as tensors are done; a cancel is seen between ticks."""
        self._hand_on, self._finish_tensor = hand_on, finish_tensor
        for chunk in chunks:
            while not self._room.acquire(blocking=False):
                self._wait_for_news(cancel, tick)
            self._start(chunk, tasks_of(chunk))
            self._wait_for_news(cancel, tick, wait=False)
        while self._next < self._started:  # every chunk handed on
            self._wait_for_news(cancel, tick)

    def _wait_for_news(self, cancel: CancelToken, tick: Callable[[], None],
                       wait: bool = True) -> None:
        """Wait for a worker's news (a tensor done, a chunk handed on; a poll's time at
        most), or with `wait` false take all news so far; then tick."""
        try:
            if wait:
                self._news.get(timeout=POLL_S)
            else:
                while True:
                    self._news.get_nowait()
        except queue.Empty:
            pass
        if self.error is not None:
            raise self.error
        cancel.raise_if_cancelled()
        tick()

    def _start(self, chunk: Chunk, piece_tasks: list[list[Task]]) -> None:
        self._started += 1
        job = _Job(chunk, [chunk.bytes_of(piece) for piece in chunk.pieces])
        queued = []
        with self._lock:
            for i, (piece, tasks) in enumerate(zip(chunk.pieces, piece_tasks, strict=True)):
                if len(tasks) > 1:
                    self._parts_left[piece.key] = len(tasks)
                queued += [(job, i, piece.key, task, len(tasks) == 1) for task in tasks]
            job.left = len(queued)
            if not queued:
                self._done(job)
        for item in queued:
            self._tasks.put(item)

    def _work(self, setup: Callable[[], None]) -> None:
        try:
            setup()
        except BaseException as exc:
            self._fail(exc)
        while (item := self._tasks.get()) is not None:
            if self._stop.is_set():
                continue
            job, i, key, task, whole = item
            try:
                result = task()
                with self._lock:
                    self._record(job, i, key, whole, result)
            except BaseException as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """Keep the first error, for `run` to raise, and drop the tasks left."""
        traceback.clear_frames(exc.__traceback__)
        self.error = self.error or exc
        self._stop.set()
        self._news.put(exc)

    def _record(self, job: _Job, i: int, key: str, whole: bool, result) -> None:
        """With the lock held: a task is done (a piece's only task: its result is the
        piece's)."""
        if whole:
            job.results[i] = result
            self._tensor_done(key)
        else:
            self._parts_left[key] -= 1
            if not self._parts_left[key]:
                del self._parts_left[key]
                self._tensor_done(key)
        job.left -= 1
        if not job.left:
            self._done(job)

    def _tensor_done(self, key: str) -> None:
        self.tensors_done += 1
        self._finish_tensor(key)
        self._news.put(key)

    def _done(self, job: _Job) -> None:
        """With the lock held (so that chunks are handed on in order): hand on this chunk and
        any finished ones waiting for it."""
        self._finished[job.chunk.index] = job
        while (ready := self._finished.pop(self._next, None)) is not None:
            self._next += 1
            self._hand_on(ready.chunk, ready.results)
            self._room.release()
            self._news.put(ready.chunk.index)

    def __enter__(self) -> BakeCrew:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()
