"""A streaming safetensors writer: header first, tensors in any order, atomic rename at the end.

Why our own writer: `safetensors.torch.save_file` needs every tensor in memory at once, which is
exactly what a streaming merge must avoid. The format is simple (8-byte length, JSON header,
raw little-endian data), and files written here load with the reference library (tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mergekit_sd.errors import UserError
from mergekit_sd.io.direct import DIRECT_FROM_BYTES, DirectAppender, pwrite_all
from mergekit_sd.io.dtypes import SAFETENSORS_DTYPES, nbytes_of, safetensors_dtype
from mergekit_sd.io.interrupts import interrupts_held

ALIGNMENT = 8  # header padded with spaces so tensor data starts 8-byte aligned, as the library does


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What will be written under a name: safetensors dtype (e.g. "F16") and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = 1
        for d in self.shape:
            size *= d
        n = nbytes_of(self.dtype, size)
        if n is None:
            raise ValueError(f"{self.name}: {self.dtype} {self.shape} does not fill whole bytes")
        return n


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def check_output_path(path: Path, overwrite: bool = True) -> None:
    """UserError with one sentence when `path` cannot be written as a file: it is a directory,
    or a folder it would go into is a file or cannot be written, or (unless `overwrite`) it
    exists. Called before any work, so a long merge does not end in an error it could have
    said at the start."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory; name the file to write")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    for folder in path.parents:
        if folder.is_dir():
            check_folder_writable(path, folder)
            return
        if folder.exists() or folder.is_symlink():
            raise UserError(f"{path}: its folder {folder} is a file, not a folder; choose "
                            "another output path")


def check_folder_writable(path: Path, folder: Path) -> None:
    """UserError with one sentence unless a file can be created in `folder` (the existing
    folder `path` goes into, or where its missing folders would be made). A file is created
    and removed (unnamed where the system allows): `os.access` says yes to root on read-only
    or virtual file systems (/proc, /sys), and only the attempt also knows those."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".mergekit-sd-probe-"):
            pass
    except OSError as exc:
        where = (f"its folder {folder}" if folder == path.parent
                 else f"its folder {path.parent} would be made in {folder}, which")
        raise UserError(f"{path}: {where} cannot be written ({exc.strerror or exc}); choose "
                        "another output path") from None


def same_file(a: Path, b: Path) -> bool:
    """Whether writing `b` would replace `a`: the same path, or a link to the same file."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_replacing_inputs(output: Path, inputs) -> None:
    """UserError when writing `output` would replace one of `inputs` (the same path spelt
    otherwise, a link or a hard link to it): an input is read while the output is written,
    and replacing it would lose it, --overwrite or not."""
    for path in inputs:
        if same_file(Path(path), Path(output)):
            raise UserError(f"-o {output} is the input {path} (the same file); writing it "
                            "would replace that input, --overwrite or not; choose another -o")


def make_output_folder(path: Path) -> None:
    """Create the folder `path` goes into, or say in one sentence why it cannot be."""
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot create its folder {path.parent} ({exc.strerror}); "
                        "choose another output path") from None


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """NAME.partial, open for writing; when the block is done it is fsynced and renamed to
    NAME, and on any failure (Ctrl-C included) removed, with NAME left as it was."""
    make_output_folder(path)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write a small file whole (an image, a sidecar, a manifest) atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)
    return path


def build_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None
                 ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The padded header bytes and each tensor's (begin, end) in the data area."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: unknown safetensors dtype {spec.dtype!r}")
        if spec.name in offsets or spec.name == "__metadata__":
            raise ValueError(f"tensor name {spec.name!r} appears twice")
        end = position + spec.nbytes
        offsets[spec.name] = (position, end)
        doc[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                          "data_offsets": [position, end]}
        position = end
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw, offsets


class StreamingWriter:
    """Write a safetensors file whose tensor list is known up front.

    Use as a context manager: the file is built as NAME.partial and renamed to NAME only when
    every tensor has been written and the data is on disk; any exception (Ctrl-C included)
    removes the partial file, and a killed process leaves only the .partial name behind.

    Tensors written in the declared order go out with O_DIRECT (`io.direct`) when the file is
    large (`direct=None`, the default) or `direct=True`; the first write anywhere else turns the
    rest into ordinary writes.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec],
                 metadata: Mapping[str, str] | None = None, direct: bool | None = None):
        self.path = Path(path)
        self.specs = {spec.name: spec for spec in specs}
        header, self._offsets = build_header(self.specs.values(), metadata)
        self._data_start = len(header)
        self._pending = set(self.specs)
        self._remaining = {spec.name: spec.nbytes for spec in self.specs.values()}
        self.partial = partial_path(self.path)
        make_output_folder(self.path)
        self._fd = -1
        self._sequence: DirectAppender | None = None
        self._went_direct = False
        self._size = self._data_start + (max((e for _, e in self._offsets.values()), default=0))
        try:
            # a signal between creating NAME.partial and taking charge of it would leave it
            # behind: held until this writer can delete it (then raised, and it does)
            with interrupts_held():
                self._fd = self._open_partial()
                if direct or (direct is None and self._size >= DIRECT_FROM_BYTES):
                    with contextlib.suppress(OSError):  # no O_DIRECT here: ordinary writes
                        self._sequence = DirectAppender(self.partial, self._fd)
            self._write_at(header, 0)
            os.ftruncate(self._fd, self._size)
        except BaseException:
            if self._fd >= 0:  # else NAME.partial is not ours (it could not be opened)
                self.abort()
            raise

    def _open_partial(self) -> int:
        try:
            return os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:  # checked before any work; still a sentence if it changed since
            raise UserError(f"{self.path}: cannot be written in {self.path.parent} "
                            f"({exc.strerror or exc}); choose another output path") from None

    @property
    def direct_io(self) -> bool:
        """Whether the bytes written in sequence went out with O_DIRECT."""
        return self._sequence.direct if self._sequence is not None else self._went_direct

    def _write_at(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        if self._sequence is not None:
            if offset == self._sequence.position:
                self._sequence.append(view)
                return
            self._end_sequence(whole=False)
        pwrite_all(self._fd, view, offset)

    def _end_sequence(self, whole: bool) -> None:
        """Stop appending with O_DIRECT: `whole`, everything written (the file truncated back
        after the padded last block); else the unaligned rest written here."""
        sequence = self._sequence
        if sequence is None:
            return
        # kept until it has closed: an interrupted finish is closed again by `abort`
        if whole:
            sequence.finish()
            self._sequence, self._went_direct = None, sequence.direct
            os.ftruncate(self._fd, self._size)
        else:
            offset, rest = sequence.stop_at_block()
            self._sequence, self._went_direct = None, sequence.direct
            pwrite_all(self._fd, memoryview(rest), offset)

    def write_bytes(self, name: str, data) -> None:
        """Write tensor `name` from raw bytes (any buffer of exactly its size)."""
        spec = self._spec(name)
        size = memoryview(data).nbytes
        if size != spec.nbytes:
            raise ValueError(f"{name}: got {size} bytes, expected {spec.nbytes}")
        self.write_part(name, 0, data)

    def write_part(self, name: str, offset: int, data) -> None:
        """Write bytes of tensor `name` starting `offset` bytes into it, so a tensor larger than
        the memory one wants to spend can be written in pieces. Pieces must not overlap; the
        tensor counts as written once all its bytes have arrived."""
        self.write_run([(name, offset, memoryview(data).nbytes)], data)

    def write_run(self, parts: list[tuple[str, int, int]], data) -> None:
        """Write, from one buffer and with one write, parts of tensors that lie end to end in
        the file: `parts` are (name, offset into the tensor, size) in file order (a chunk read
        whole, `io.chunks`)."""
        position = None
        for name, offset, size in parts:
            spec = self._spec(name)
            if name not in self._pending:
                raise ValueError(f"tensor {name!r} was already written")
            if offset < 0 or offset + size > spec.nbytes:
                raise ValueError(f"{name}: bytes {offset}..{offset + size} fall outside its "
                                 f"{spec.nbytes} bytes")
            if position is not None and self.file_offset(name, offset) != position:
                raise ValueError(f"{name}: bytes {offset}.. do not follow the part before")
            position = self.file_offset(name, offset) + size
        total = sum(size for _, _, size in parts)
        if memoryview(data).nbytes != total:
            raise ValueError(f"got {memoryview(data).nbytes} bytes for parts of {total}")
        if total:
            self._write_at(data, self.file_offset(parts[0][0], parts[0][1]))
        for name, _, size in parts:
            self._remaining[name] -= size
            if self._remaining[name] <= 0:
                self._pending.discard(name)

    def file_offset(self, name: str, offset: int = 0) -> int:
        """Where byte `offset` of tensor `name` goes in the file."""
        self._spec(name)
        return self._data_start + self._offsets[name][0] + offset

    def _spec(self, name: str) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{name!r} was not declared when the writer was created")
        return spec

    def write(self, name: str, tensor) -> None:
        """Write a torch tensor; its dtype and shape must match what was declared."""
        spec = self._spec(name)
        if safetensors_dtype(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                             f"declared {spec.dtype} {spec.shape}")
        import torch

        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        self.write_bytes(name, raw.numpy())

    def rewrite_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the metadata written at creation with metadata no longer than it, padded
        with the trailing spaces the format allows in a header. Placeholders for hashes still
        being computed keep the length once filled in, or shorten it where equal hashes
        merge entries keyed by hash (one file under two names, a parent of an input)."""
        header, _ = build_header(self.specs.values(), metadata)
        if len(header) > self._data_start:
            raise ValueError("the new header is longer than the one written")
        room = self._data_start - 8
        header = room.to_bytes(8, "little") + header[8:].ljust(room, b" ")
        self._end_sequence(whole=True)  # the old header may still be on its way
        self._write_at(header, 0)

    @property
    def missing(self) -> set[str]:
        return set(self._pending)

    def commit(self) -> Path:
        """Check completeness, fsync, and rename NAME.partial to NAME."""
        if self._pending:
            some = ", ".join(sorted(self._pending)[:3])
            raise RuntimeError(f"{len(self._pending)} declared tensors were never written ({some})")
        self._end_sequence(whole=True)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        check_output_path(self.path)  # a directory may have taken the name while we wrote
        os.replace(self.partial, self.path)
        fsync_directory(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Stop and delete the partial file (a second Ctrl-C waits until it is gone)."""
        with interrupts_held():
            if self._sequence is not None:
                self._sequence.abandon()
                self._sequence = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
