"""Read and validate a safetensors header without touching tensor data.

Every check that can be made from the header and the file size is made here, so a truncated
download, a renamed pickle or a corrupt header is caught before a single tensor byte is read.
"""

from __future__ import annotations

import gc
import json
import math
import os
import struct
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.dtypes import SAFETENSORS_DTYPES, nbytes_of
from mergekit_sd.io.files import os_errors_as_sentences

# The reference implementation refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_ZIP_MAGIC = b"PK\x03\x04"
GGUF_MAGIC = b"GGUF"
_BITS = {name: bits for name, (bits, _) in SAFETENSORS_DTYPES.items()}


class TensorInfo(NamedTuple):
    """One tensor's entry: its dtype, shape and absolute byte range in the file.

    A NamedTuple rather than a dataclass: headers hold thousands of these and a catalog scan
    builds them for every file, where creation cost shows."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in header order, the metadata, and where the data starts."""

    path: Path
    file_size: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def header_bytes(self) -> int:
        """Bytes read to learn all this: the length prefix and the JSON header."""
        return self.data_start

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def _fail(path, problem: str):
    raise BadModelFile(path, problem)


def _is_torch_zip(f) -> bool:
    """Whether the zip archive open in `f` is a torch save (it holds a data.pkl), not some
    other archive renamed or downloaded under a model's name."""
    try:
        with zipfile.ZipFile(f) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return True  # a damaged torch save reads like one; convert says more


def _looks_like_pickle(prefix: bytes) -> bool:
    # Zip-format torch saves start with PK; legacy pickles with the PROTO opcode 0x80 and 2..5.
    return prefix.startswith(PICKLE_ZIP_MAGIC) or (
        len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5
    )


# bytes -> object; json.loads, or a faster parser for callers that read thousands of headers
JsonLoads = Callable[[bytes], object]


def read_header(path: str | os.PathLike, loads: JsonLoads = json.loads) -> SafetensorsHeader:
    """Read and validate the header of `path`; raise BadModelFile with one sentence if invalid.

    `loads` parses the JSON. The standard library's is the default: a command that reads a few
    headers would spend more importing a faster parser than parsing; a catalog scan passes
    orjson's."""
    path = Path(path)
    with os_errors_as_sentences(path), open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            what = "is empty" if file_size == 0 else f"is only {file_size} bytes long"
            _fail(path, f"{what}, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        # A pickle's first bytes read as a header length the file cannot hold, or as one
        # whose header is not JSON; only then is it called a pickle (a valid safetensors
        # header length can start with the same bytes).
        impossible = header_len > file_size - 8 or header_len > MAX_HEADER_BYTES
        if prefix.startswith(GGUF_MAGIC) and impossible:
            _fail(path, "is a GGUF file (quantized weights for GGUF loaders), not a "
                        "safetensors file; mergekit-sd reads safetensors and PyTorch saves")
        if _looks_like_pickle(prefix) and (impossible or f.read(1) != b"{"):
            if prefix.startswith(PICKLE_ZIP_MAGIC) and not _is_torch_zip(f):
                _fail(path, "is a zip archive, not a model file; unpack it and give the "
                            ".safetensors (or .ckpt) inside")
            _fail(
                path,
                "is a PyTorch pickle, not a safetensors file; convert it with "
                "`mergekit-sd convert` and use the .safetensors it writes",
            )
        if header_len > MAX_HEADER_BYTES or _looks_like_text(prefix):
            _fail(path, _not_safetensors(path, prefix, header_len))
        f.seek(8)
        if header_len > file_size - 8:
            _fail(
                path,
                f"declares a {header_len}-byte header but the file has only {file_size} "
                "bytes (a truncated download, or not a safetensors file)",
            )
        raw = f.read(header_len)
    return parse_header(path, raw, file_size, loads)


# bytes of text files: printable ASCII, tab, newline, carriage return, and UTF-8's lead and
# continuation bytes. Eight of them read as a header length of at least 0x0909090909090909,
# far beyond MAX_HEADER_BYTES: no safetensors file starts so.
_TEXT_BYTES = frozenset(b"\t\n\r") | frozenset(range(0x20, 0x7F)) | frozenset(range(0x80, 0xF5))


def _looks_like_text(prefix: bytes) -> bool:
    return all(byte in _TEXT_BYTES for byte in prefix)


def _not_safetensors(path: Path, prefix: bytes, header_len: int) -> str:
    """Why a file whose first 8 bytes are no header length a safetensors file can have (text,
    or a length over the format's limit) is not one: never the nonsense length itself alone,
    and no "truncated" (the catalog calls a file that only when its length is plausible)."""
    if not _looks_like_text(prefix):
        return (f"is not a safetensors file (its first 8 bytes give a {header_len}-byte "
                "header, over the format's 100 MB limit)")
    if path.suffix.lower() in (".yaml", ".yml"):
        return ("is not a safetensors file (it is text); a YAML recipe is run with "
                f"`mergekit-sd plan {path}` and `mergekit-sd merge {path}`")
    return "is not a safetensors file (it is text)"


def parse_header(path: Path, raw: bytes, file_size: int, loads: JsonLoads = json.loads
                 ) -> SafetensorsHeader:
    """Validate the JSON header `raw` of a file of `file_size` bytes."""
    with _collector_paused():
        return _parse_header(path, raw, file_size, loads)


@contextmanager
def _collector_paused():
    """Pause the cyclic garbage collector while a header is parsed.

    A header is thousands of small acyclic objects; building them triggers collections whose
    cost grows with everything else alive (a catalog scan holds many headers' worth), which
    measured at up to two thirds of parse time. Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_header(path: Path, raw: bytes, file_size: int, loads: JsonLoads
                  ) -> SafetensorsHeader:
    data_start = 8 + len(raw)
    try:
        doc = loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _fail(path, f"has a header that is not valid JSON ({exc.__class__.__name__} at "
                    f"byte {getattr(exc, 'pos', '?')}); the file is corrupt")
    except RecursionError:  # the JSON parser recurses once per level of nesting
        _fail(path, "has a header nested too deeply to be a safetensors header; the file is "
                    "corrupt")
    if not isinstance(doc, dict):
        _fail(path, "has a header that is not a JSON object; the file is corrupt")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        _fail(path, "has a __metadata__ entry that is not a map of strings to strings")

    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int]] = []
    bits_of = _BITS
    prod = math.prod
    new_info = tuple.__new__  # TensorInfo(...) without its Python-level __new__ frame
    for name, entry in doc.items():
        # the common case inline (this loop runs for every key of every file a scan sees);
        # anything unusual goes to _tensor_info for a precise message
        try:
            dtype = entry["dtype"]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            numel = prod(shape)
            # prod of anything but ints is no int; min() catches negative dimensions
            ok = (type(numel) is int and type(begin) is int and type(end) is int
                  and 0 <= begin <= end and (not shape or min(shape) >= 0)
                  and numel * bits_of[dtype] == (end - begin) * 8)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            _tensor_info(path, name, entry, data_start)  # raises with the exact problem
        tensors[name] = new_info(TensorInfo, (name, dtype, shape, data_start + begin,
                                              data_start + end))
        ranges.append((begin, end))
    _check_byte_ranges(path, tensors, ranges, data_start, file_size)
    return SafetensorsHeader(path, file_size, data_start, tensors, metadata)


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        _fail(path, f"tensor {name!r} lacks a dtype, shape or two data_offsets in its header entry")
    if dtype not in SAFETENSORS_DTYPES:
        _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
        _fail(path, f"tensor {name!r} has invalid data_offsets [{begin!r}, {end!r}]")
    expected = nbytes_of(dtype, math.prod(shape))
    if expected != end - begin:
        _fail(
            path,
            f"tensor {name!r} is {dtype} {shape}, which needs {expected} bytes, but its "
            f"data_offsets span {end - begin} bytes; the file is corrupt; download it again",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_byte_ranges(path: Path, tensors: dict[str, TensorInfo], ranges: list[tuple[int, int]],
                       data_start: int, file_size: int) -> None:
    """Tensors must tile the data area exactly: no gap, no overlap, nothing past the end.
    `ranges` holds each tensor's (begin, end) relative to the data area."""
    ranges.sort()
    position = 0
    for begin, end in ranges:
        if begin != position:
            break
        position = end
    else:
        if data_start + position > file_size:
            missing = data_start + position - file_size
            _fail(path, f"is truncated: its tensor offsets need {data_start + position} bytes "
                        f"but the file has {file_size} ({missing} missing); download it again")
        if data_start + position < file_size:
            _fail(path, f"has {file_size - data_start - position} unexpected bytes after the "
                        "last tensor")
        return
    # the slow path, only for a corrupt file: find the tensor to name in the sentence
    name = next(info.name for info in tensors.values()
                if (info.start - data_start, info.end - data_start) == (begin, end))
    if begin < position:
        _fail(path, f"tensor {name!r} overlaps the tensor before it (byte {begin} of the data "
                    "area)")
    _fail(path, f"has {begin - position} unused bytes before tensor {name!r}; the offsets are "
                "corrupt")
