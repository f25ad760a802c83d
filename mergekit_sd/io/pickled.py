"""Read PyTorch pickle checkpoints (.ckpt/.pt/.pth/.bin) without ever running code from them.

Pickles are programs: unpickling one with the standard library can call any function the file
names. The only loader used here is `torch.load(weights_only=True)`, whose restricted unpickler
builds tensors, containers and plain values and refuses every other global. A file it refuses is
reported, never retried with the unrestricted loader (DESIGN.md, decision 11).

A few globals that training frameworks put into otherwise plain checkpoints (Lightning's
ModelCheckpoint callback state, numpy scalars in it) are mapped to inert stand-in classes
defined here, so the file's tensors can still be read; those values are skipped like any other
non-tensor value. Nothing named by the file is imported or called.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.files import os_errors_as_sentences

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Keys under which training code nests the weights, most specific first. `params_ema` before
# `params`: BasicSR/ESRGAN files carry both, and the EMA weights are the ones used.
CONTAINER_KEYS = ("state_dict", "params_ema", "params", "model", "module")

ZIP_MAGIC = b"PK\x03\x04"
MAX_NAME_IN_MESSAGE = 100


@dataclass
class PickleCheckpoint:
    """What a pickle checkpoint held: its tensors by flat name, and what was left out."""

    tensors: dict[str, object]  # name -> torch.Tensor, in file order
    skipped: int  # non-tensor values left out (step counters, optimizer state, callbacks...)
    container: str | None  # the top-level key the weights were nested under, if any
    format: str  # "zip" (torch >= 1.6 default) or "legacy"


class _Inert:
    """Stands in for a known, harmless class named by a checkpoint; keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


# Globals found in real Stable Diffusion / latent-diffusion checkpoints next to the weights.
_INERT_GLOBALS = [
    _inert(name)
    for name in (
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
    )
]


def load_pickle_state_dict(path: str | os.PathLike) -> dict[str, object]:
    """The tensors of a pickle checkpoint by flat name (file order); see load_pickle_checkpoint."""
    return load_pickle_checkpoint(path).tensors


def load_pickle_checkpoint(path: str | os.PathLike) -> PickleCheckpoint:
    """Load a .ckpt/.pt/.pth/.bin safely and return its tensors as a flat name -> tensor dict.

    Raises BadModelFile with one sentence when the file is missing, is not a PyTorch
    checkpoint, is truncated, holds no tensors, or would need to run code to be loaded.
    Tensors may share storage (views); writers must copy them out contiguously.
    """
    path = Path(path)
    kind = _sniff(path)
    with os_errors_as_sentences(path):
        obj = _torch_load(path, kind)
    if not isinstance(obj, dict):
        _fail(path, f"holds a {type(obj).__name__}, not a dictionary of named tensors")
    top, container, dropped = _unwrap(obj)
    tensors: dict[str, object] = {}
    skipped = dropped
    for name, value in _flatten(top, ""):
        if value is None:
            skipped += 1
            continue
        if name in tensors:
            _fail(path, f"has two tensors that both flatten to the name {_safe(name)!r}")
        tensors[name] = value
    if not tensors:
        _fail(path, "holds no tensors, so it is not a model checkpoint")
    _check_layouts(path, tensors)
    return PickleCheckpoint(tensors, skipped, container, kind)


def pickle_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """name -> (safetensors dtype, shape) of a checkpoint's tensors, for identifying it without
    reading its weights: a zip checkpoint (torch >= 1.6) is loaded through the safe loader with
    its tensors memory-mapped, so only its small pickle is read. None for a legacy pickle, which
    the loader can only read whole (every byte of a 4 GB .ckpt). BadModelFile as
    load_pickle_checkpoint, also for a dtype safetensors cannot hold."""
    path = Path(path)
    if _sniff(path) == "legacy":
        return None
    tensors = load_pickle_checkpoint(path).tensors
    from mergekit_sd.io.dtypes import safetensors_dtype

    try:
        return {name: (safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
    except ValueError as exc:
        _fail(path, f"holds a tensor safetensors cannot store ({exc})")


def pickle_header(path: str | os.PathLike):
    """A zip checkpoint's tensors as a `SafetensorsHeader` (no metadata; byte ranges as if laid
    out in a safetensors file, which the sizes and counts are made from), for identifying it
    as a safetensors file is identified (`inspect`, a catalog scan); None for a legacy pickle
    (`pickle_tensor_shapes`). BadModelFile as load_pickle_checkpoint."""
    from math import prod

    from mergekit_sd.io.dtypes import nbytes_of
    from mergekit_sd.io.header import SafetensorsHeader, TensorInfo

    path = Path(path)
    shapes = pickle_tensor_shapes(path)
    if shapes is None:
        return None
    tensors, offset = {}, 0
    for name, (dtype, shape) in shapes.items():
        end = offset + (nbytes_of(dtype, prod(shape)) or 0)
        tensors[name] = TensorInfo(name, dtype, shape, offset, end)
        offset = end
    return SafetensorsHeader(path, path.stat().st_size, 0, tensors)


def _fail(path: Path, problem: str):
    raise BadModelFile(path, problem)


def sniff_format(head: bytes, size: int) -> str:
    """'safetensors', 'zip', 'legacy' (a pickle) or 'unknown', from a file's first 9 bytes.

    Safetensors is tested first: its first 8 bytes are a little-endian header length, which can
    start 0x80 0x02 like a pickle, while a real torch pickle or zip makes that length absurd.
    """
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "legacy"
    return "unknown"


def _sniff(path: Path) -> str:
    """'zip', 'legacy' or 'unknown' from the first bytes; one sentence for files that are not."""
    with os_errors_as_sentences(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
    if size == 0:
        _fail(path, "is empty")
    kind = sniff_format(head, size)
    if kind == "safetensors":
        _fail(path, "is a safetensors file, not a PyTorch pickle; rename it to end in .safetensors")
    return kind


def _torch_load(path: Path, kind: str):
    # a scan or `inspect` meets its first pickle with torch not imported yet: imported with
    # Ctrl-C held, as every command imports it (cli_startup), for a Ctrl-C inside torch's
    # import is swallowed or aborts the process
    from mergekit_sd.cli_startup import import_torch

    torch = import_torch()
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        with warnings.catch_warnings():
            # torch warns (on stderr) about pickle protocols and the like; we report in one line.
            warnings.simplefilter("ignore")
            if safe_globals is None:  # torch < 2.5 has no allowlist context
                return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
            with safe_globals(_INERT_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except (MemoryError, OSError):
        raise  # the caller's os_errors_as_sentences words OS refusals
    except Exception as exc:
        raise BadModelFile(path, _explain(path, kind, exc)) from None


_GLOBAL_RE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_OPCODE_RE = re.compile(r"Unsupported operand (\d+)")
_CODE_MARKERS = (
    "Trying to call reduce for unrecognized function",
    "Can only create new object for",
    "Can only build Tensor",
    "must be imported to load",
    "persistent_load id must be",
    "Only persistent_load of storage",
)


def _explain(path: Path, kind: str, exc: Exception) -> str:
    """One sentence for why torch's safe loader refused or failed on the file."""
    message = str(exc)
    match = _GLOBAL_RE.search(message)
    if match and not _global_cut_by_end_of_file(path, match.group(1)):
        return (
            "was refused because loading it would run code from the file "
            f"(it needs {_safe(match.group(1))}); convert it with another tool only if you "
            "trust its source"
        )
    if not match and any(marker in message for marker in _CODE_MARKERS):
        return (
            "was refused because loading it would run code from the file; convert it with "
            "another tool only if you trust its source"
        )
    if kind == "zip":
        if "locating file data.pkl" in message or "not in a subdirectory" in message:
            return "is a zip archive but not a PyTorch checkpoint"
        return (
            "is a truncated or corrupt PyTorch checkpoint (a damaged zip archive); "
            "download it again"
        )
    opcode = _OPCODE_RE.search(message)
    if kind == "legacy":
        if opcode:
            return (
                "is a pickle the safe loader cannot read (it uses pickle opcode "
                f"{opcode.group(1)}, which PyTorch checkpoints do not); it is corrupt or not "
                "a PyTorch checkpoint"
            )
        return "is a truncated or corrupt PyTorch checkpoint; download it again"
    return "is not a PyTorch checkpoint (it is neither a zip archive nor a pickle)"


def _global_cut_by_end_of_file(path: Path, full_name: str) -> bool:
    """Whether a refused GLOBAL is only a name cut short by the end of a truncated file.

    The unpickler reads a GLOBAL's module and name as two lines and drops each line's last
    byte, so a file that ends inside them yields names like `torch._utils._rebuild_te` or
    `torch._ut.`: those mean a truncated download, not a file that wants to run code.
    """
    if full_name == "" or full_name.endswith("."):
        return True  # the name line was never read: the file ends inside the module line
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 2 * len(full_name) - 8))
            tail = f.read()
    except OSError:
        return False
    if not tail or tail.endswith(b"\n"):
        return False
    last_line = tail.rsplit(b"\n", 1)[-1]
    cut = last_line[:-1].decode("utf-8", "replace")
    return cut != "" and (full_name.endswith("." + cut) or full_name == cut)


def _safe(text: str) -> str:
    """Text from the file, made printable and short for a one-line message."""
    cleaned = "".join(ch if ch.isprintable() and ch not in "\r\n" else "?" for ch in text)
    if len(cleaned) > MAX_NAME_IN_MESSAGE:
        cleaned = cleaned[: MAX_NAME_IN_MESSAGE - 3] + "..."
    return cleaned


def _has_tensor(value, depth: int = 0) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict) and depth < 8:
        return any(_has_tensor(v, depth + 1) for v in value.values())
    return False


def _unwrap(obj: dict) -> tuple[dict, str | None, int]:
    """The dict that holds the weights, the container path taken, and top-level values dropped."""
    import torch

    path: list[str] = []
    dropped = 0
    for _ in range(4):  # e.g. {"module": {"state_dict": ...}}; deeper nesting is not seen
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next(
            (k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict) and _has_tensor(obj[k])),
            None,
        )
        if key is None:
            break
        dropped += len(obj) - 1
        path.append(key)
        obj = obj[key]
    return obj, ".".join(path) or None, dropped


def _flatten(value: dict, prefix: str, depth: int = 0) -> Iterator[tuple[str, object]]:
    """(name, tensor) pairs with nested dict keys joined by '.'; (name, None) for skipped values."""
    import torch

    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, torch.Tensor):
            yield name, item.detach()
        elif isinstance(item, dict) and depth < 16:
            if item:
                yield from _flatten(item, name + ".", depth + 1)
        else:
            yield name, None


def _check_layouts(path: Path, tensors: dict[str, object]) -> None:
    import torch

    for name, tensor in tensors.items():
        if tensor.is_meta:  # saved from torch's meta device: a shape without any data
            _fail(path, f"tensor {_safe(name)!r} has no data (a meta tensor); save the "
                        "checkpoint again from a loaded model")
        if tensor.layout != torch.strided:
            _fail(path, f"tensor {_safe(name)!r} is a {tensor.layout} tensor; only dense "
                        "tensors can be converted")
        if tensor.is_quantized:
            _fail(path, f"tensor {_safe(name)!r} is a quantized tensor ({tensor.dtype}), which "
                        "safetensors cannot store")
