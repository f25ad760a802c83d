"""A safetensors file's tensors as views of one copy-on-write mapping of it.

Reading a large file into fresh memory costs a page fault per 4 KiB on top of the copy;
mapped, its tensors are the page cache's pages until one is written to, which then gets a
private copy and never reaches the file (fusing a LoRA into a rendered parameter, say). As with
the safetensors library's own loading, truncating the file while its tensors are in use would
fault. The header was validated against the file's size, so every range is inside the mapping.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterable

from mergekit_sd.io.dtypes import torch_dtype
from mergekit_sd.io.reader import SafetensorsReader

_MADV_POPULATE_READ = 22  # Linux 5.14+; not named by Python's mmap module before 3.13


class MappedTensors:
    """`tensor(key)` views the key's bytes in the mapping. Never closed here: torch.frombuffer
    keeps a reference to the mapping, not a buffer export, so closing would unmap memory that
    tensors still use; it is unmapped when the last tensor viewing it is gone."""

    def __init__(self, reader: SafetensorsReader):
        self.reader = reader
        with open(reader.path, "rb") as f:
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def tensor(self, key: str):
        import torch

        info = self.reader.tensors[key]
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0 or info.start % dtype.itemsize:  # nothing to view; misaligned
            return self.reader.read_tensor(key)
        return torch.frombuffer(self.mapping, dtype=dtype, count=info.nbytes // dtype.itemsize,
                                offset=info.start).reshape(info.shape)

    def populate(self, keys: Iterable[str]) -> None:
        """Map the pages of `keys` now (read-only; copy-on-write stays) in one call, cheaper
        than a fault each."""
        spans = [(self.reader.tensors[k].start, self.reader.tensors[k].end) for k in keys]
        if not spans:
            return
        first = min(s for s, _ in spans) // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):  # an older kernel: pages fault in
            self.mapping.madvise(_MADV_POPULATE_READ, first, max(e for _, e in spans) - first)

    def release(self, keys: Iterable[str]) -> None:
        """Hand back the memory of `keys`, which the caller will not read again (a bake is
        done with a module once its weight is written): the pages wholly inside their bytes
        leave this process (they stay in the page cache, and would be mapped again if read).
        Only for tensors never written to: a written page's private copy would be lost."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        page = mmap.PAGESIZE
        for key in keys:
            info = self.reader.tensors[key]
            first, end = -(-info.start // page) * page, info.end // page * page
            if end > first:
                with contextlib.suppress(OSError, ValueError):
                    self.mapping.madvise(advice, first, end - first)
