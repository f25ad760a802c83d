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
