"""Lazy access to one tensor of a safetensors file at a time (pread of its byte range)."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_sd.io.dtypes import SAFETENSORS_DTYPES, torch_dtype
from mergekit_sd.io.header import SafetensorsHeader, TensorInfo, read_header


def pread_exact(fd: int, buffer, offset: int) -> None:
    """Fill `buffer` from `fd` at `offset`; a short read means the file shrank under us."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"file ended {len(view) - done} bytes early while reading")
        done += n


class SafetensorsReader:
    """An open safetensors file whose tensors are read one at a time, on demand.

    Counts the bytes it reads, so callers (and benchmarks) can show how little was touched.
    """

    def __init__(self, path: str | os.PathLike, header: SafetensorsHeader | None = None):
        # set first: read_header raises for a bad file, and __del__ then closes what was opened
        self._fd = -1
        self.path = Path(path)
        self.header = header or read_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.bytes_read = self.header.header_bytes

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def __contains__(self, name: str) -> bool:
        return name in self.header.tensors

    def read_into(self, name: str, buffer) -> None:
        """Copy tensor `name`'s raw bytes into a writable buffer of exactly its size."""
        info = self.header.tensors[name]
        pread_exact(self._fd, buffer, info.start)
        self.bytes_read += info.nbytes

    def read_at(self, offset: int, buffer) -> None:
        """Fill `buffer` with the file's bytes from `offset` (a span of several tensors)."""
        pread_exact(self._fd, buffer, offset)
        self.bytes_read += memoryview(buffer).nbytes

    def read_bytes(self, name: str) -> bytearray:
        buffer = bytearray(self.header.tensors[name].nbytes)
        self.read_into(name, buffer)
        return buffer

    def read_tensor(self, name: str):
        """The tensor as a CPU torch tensor that owns its memory (no mmap kept alive)."""
        import torch

        info = self.header.tensors[name]
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(name, flat.numpy())
        return flat.view(dtype).reshape(info.shape)

    def read_range(self, name: str, first: int, count: int):
        """Elements [first, first + count) of the flattened tensor, as a CPU torch tensor."""
        import torch

        info = self.header.tensors[name]
        itemsize = SAFETENSORS_DTYPES[info.dtype][0] // 8
        flat = torch.empty(count * itemsize, dtype=torch.uint8)
        if count:
            pread_exact(self._fd, flat.numpy(), info.start + first * itemsize)
            self.bytes_read += count * itemsize
        return flat.view(torch_dtype(info.dtype))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


_SCALAR_FORMATS = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i"}


def read_scalar(reader: SafetensorsReader, name: str) -> float:
    """One small tensor's first value as a Python float, without importing torch (for LoRA alphas
    and similar one-number tensors)."""
    import struct

    info = reader.tensors[name]
    raw = bytes(reader.read_bytes(name))
    if info.dtype == "BF16":  # bfloat16 is the top half of a float32
        return struct.unpack("<f", b"\x00\x00" + raw[:2])[0]
    fmt = _SCALAR_FORMATS.get(info.dtype)
    if fmt is None or not raw:
        raise ValueError(f"{name}: cannot read a {info.dtype} scalar")
    return float(struct.unpack_from(fmt, raw)[0])
