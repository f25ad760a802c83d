"""Large reusable buffers for streaming passes: page-aligned, private, on huge pages where the
kernel offers them.

Why huge pages: a bake streams gigabytes through a few 16 MB buffers that the kernel copies
into (reads), the matrix kernels work on, and the disk reads back out of (O_DIRECT writes pin
every page). With 4 KiB pages each buffer is 4,096 TLB entries and as many pages to pin per
write; with transparent huge pages it is eight. Python's own anonymous `mmap` is a shared
mapping, which the kernel keeps on small pages, hence the private mapping and the advice.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading


def page_buffer(size: int) -> mmap.mmap:
    """`size` bytes of zeroed, page-aligned, writable memory that is this process's own."""
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0)
    buffer = mmap.mmap(-1, size, flags=flags)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is not None:
        # a kernel built without transparent huge pages refuses: small pages then
        with contextlib.suppress(OSError):
            buffer.madvise(advice)
    return buffer


HUGE_PAGE = 2 << 20


class BufferPool:
    """A few large buffers, taken and given back, that several passes over one file can share
    (a bake copies part of the file, then bakes the rest): their memory is faulted in once.
    Fresh memory costs more than the copy into it on some machines (each page is zeroed, and a
    virtual machine's host may back it only when first touched), so buffers are made only when
    first taken, and one too small for what it must hold is replaced by a larger one, which
    stays. Sizes are whole huge pages, so that the kernel can place them on huge pages."""

    def __init__(self, count: int, size: int):
        self.size = _whole_huge_pages(size)
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # a buffer not made yet

    def take(self, size: int, stop: threading.Event) -> mmap.mmap | None:
        """A buffer of at least `size` bytes, waiting while all are taken; None once `stop`
        is set."""
        while not stop.is_set():
            try:
                buffer = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            if buffer is None or len(buffer) < size:
                buffer = page_buffer(_whole_huge_pages(max(size, self.size)))
            return buffer
        return None

    def give(self, buffer: mmap.mmap) -> None:
        self._free.put(buffer)


def _whole_huge_pages(size: int) -> int:
    return -(-size // HUGE_PAGE) * HUGE_PAGE if size >= HUGE_PAGE else size
