"""Convert a checkpoint to safetensors, or recast a safetensors file to another float dtype.

Pickles (.ckpt/.pt/.pth/.bin) are loaded only through `torch.load(weights_only=True)`
(mergekit_sd.io.pickled). A .safetensors source is read one tensor at a time, so recasting a
large model needs memory for one tensor, not for the model. The output is written as
NAME.partial and renamed to NAME only once it is complete (StreamingWriter).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.dtypes import (
    CHECKPOINT_DTYPES,
    FLOAT_DTYPES,
    USER_DTYPES,
    dtype_name,
    parse_dtype,
    safetensors_dtype,
    torch_dtype,
)
from mergekit_sd.io.nonfinite import NonFinite, all_finite, count_nonfinite
from mergekit_sd.io.saturate import Clamped, checked_cast
from mergekit_sd.io.writer import StreamingWriter, TensorSpec, check_output_path, same_file

ProgressCallback = Callable[[int, int], None]

META_CONVERTED_FROM = "mergekit_sd.converted_from"
META_DTYPE = "mergekit_sd.dtype"
# A merged file's recipe is carried as is: it says how the merge was made, and it cannot say
# how to make the conversion (cast twice, values round differently). This key names the file
# the recipe makes, so `recipe extract` writes a recipe for that file, never for the conversion.
META_RECIPE_OUTPUT = "mergekit_sd.recipe_output"
META_RECIPE = "mergekit_sd.recipe"
META_BAKED_LORAS = "mergekit_sd.baked_loras"  # a bake's own recipe, written after any conversion


def convert_to_safetensors(
    source: str | os.PathLike,
    target: str | os.PathLike,
    dtype: str = "keep",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    clamped: Clamped | None = None,
    nonfinite: NonFinite | None = None,
) -> Path:
    """Write `source` (a pickle checkpoint or a .safetensors file) to `target` as safetensors.

    dtype: "keep", or a name from USER_DTYPES ("fp16", "bf16", "fp8_e4m3fn", ...); only
    floating-point tensors are cast, integer and bool tensors keep their dtype.
    progress(done, total) is called after each tensor is written. Values beyond a narrower
    float dtype's range are clamped to it (never ±inf), and counted in `clamped`; NaN and ±inf
    the source holds stay (fp8_e4m3fn, which has no infinity, clamps ±inf), and the tensors
    holding them are recorded in `nonfinite`. Raises
    UserError (or its BadModelFile subclass) with one sentence for anything the user can fix;
    on any exception, including KeyboardInterrupt, nothing is left under the target name or
    NAME.partial.
    """
    source, target = Path(source), Path(target)
    cast_to = _cast_dtype(dtype)
    _check_target(source, target, overwrite)
    cast = _Cast(source, clamped, nonfinite)
    try:
        if source.suffix.lower() == ".safetensors":
            _refuse_misnamed_pickle(source)
            return _convert_safetensors(source, target, dtype, cast_to, progress, cast)
        return _convert_pickle(source, target, dtype, cast_to, progress, cast)
    finally:
        cast.close()


class _Cast:
    """Each tensor into the output dtype, as `checked_cast` does, recording what it finds. A
    tensor the cast does not read (written as it is, or widened) is checked for NaN and ±inf
    on a thread of its own while the tensor is written: that read costs about a tenth of a
    copy's time, which overlapping hides (ad-hoc timing in the commit that added this)."""

    def __init__(self, source: Path, clamped: Clamped | None, nonfinite: NonFinite | None):
        self.source, self.clamped, self.nonfinite = source, clamped, nonfinite
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="check") \
            if nonfinite is not None else None
        self._checking: Future | None = None

    def __call__(self, name: str, tensor, dtype):
        cast, finite = checked_cast(tensor, dtype, name, self.clamped)
        if finite is None:
            self._check_later(name, tensor)
        elif not finite:
            self._record(name, cast)
        return cast

    def check_bytes(self, name: str, raw, dtype: str) -> None:
        """Check a float tensor copied as its bytes."""
        if dtype in FLOAT_DTYPES and len(raw):
            import torch

            self._check_later(name, torch.frombuffer(raw, dtype=torch_dtype(dtype)))

    def _check_later(self, name: str, tensor) -> None:
        if self._checker is None:
            return
        self.wait()
        self._checking = self._checker.submit(self._check, name, tensor)

    def _check(self, name: str, tensor) -> None:
        if not all_finite(tensor):
            self._record(name, tensor)

    def _record(self, name: str, tensor) -> None:
        if self.nonfinite is not None:
            self.nonfinite.add(name, *count_nonfinite(tensor), [self.source.name])

    def wait(self) -> None:
        """Let the check under way end (the one before the next tensor's, or the last)."""
        checking, self._checking = self._checking, None
        if checking is not None:
            checking.result()

    def close(self) -> None:
        if self._checker is not None:
            self._checker.shutdown(wait=True)


def _cast_dtype(dtype: str) -> str | None:
    """The safetensors dtype floats are cast to, or None for "keep"."""
    key = parse_dtype(dtype, CHECKPOINT_DTYPES, "convert")
    return None if key == "keep" else USER_DTYPES[key]


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    if target.suffix.lower() != ".safetensors":
        raise UserError(f"{target}: the output file name must end in .safetensors")
    if same_file(source, target):
        raise UserError(f"{target}: the output is the source file itself; choose another name")
    check_output_path(target, overwrite)


def _refuse_misnamed_pickle(source: Path) -> None:
    from mergekit_sd.io.pickled import sniff_format

    try:
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
    except OSError:
        return  # read_header reports missing files and directories in its own words
    if sniff_format(head, size) in ("zip", "legacy"):
        raise BadModelFile(source, "is a PyTorch pickle, not a safetensors file; rename it to "
                                   "end in .ckpt and convert that")


def _metadata(base: dict[str, str], source: Path, dtype: str) -> dict[str, str]:
    metadata = dict(base)
    metadata.setdefault("format", "pt")  # transformers refuses safetensors metadata without it
    if META_RECIPE in base:  # a merge's own output, or a conversion of one already
        metadata[META_RECIPE_OUTPUT] = recipe_output_name(base) or source.name
    metadata[META_CONVERTED_FROM] = source.name  # the name only: never leak directories
    metadata[META_DTYPE] = dtype_name(dtype)
    return metadata


def recipe_output_name(metadata: dict[str, str]) -> str | None:
    """The name of the file the carried mergekit-sd recipe makes, when the file with this
    `metadata` is a conversion of that file rather than the file itself; None when the recipe
    describes the file itself (or there is none)."""
    if META_RECIPE not in metadata:
        return None
    if META_RECIPE_OUTPUT in metadata:
        return metadata[META_RECIPE_OUTPUT]
    # converted before that key was written: converted_from names the merge's output, unless
    # the recipe is a bake's, which keeps the converted_from of the base it was baked into
    if META_CONVERTED_FROM in metadata and META_BAKED_LORAS not in metadata:
        return metadata[META_CONVERTED_FROM]
    return None


def _out_dtype(stored: str, cast_to: str | None) -> str:
    return cast_to if cast_to is not None and stored in FLOAT_DTYPES else stored


def _convert_safetensors(source: Path, target: Path, dtype: str, cast_to: str | None,
                         progress: ProgressCallback | None, cast: _Cast) -> Path:
    from mergekit_sd.io.reader import SafetensorsReader

    with SafetensorsReader(source) as reader:
        infos = list(reader.tensors.values())
        specs = [TensorSpec(i.name, _out_dtype(i.dtype, cast_to), i.shape) for i in infos]
        metadata = _metadata(reader.metadata, source, dtype)
        with StreamingWriter(target, specs, metadata) as writer:
            for done, (info, spec) in enumerate(zip(infos, specs, strict=True), start=1):
                if spec.dtype == info.dtype:
                    raw = reader.read_bytes(info.name)
                    cast.check_bytes(info.name, raw, info.dtype)
                    writer.write_bytes(info.name, raw)
                    del raw
                else:
                    tensor = reader.read_tensor(info.name)
                    writer.write(info.name, cast(info.name, tensor, torch_dtype(spec.dtype)))
                    del tensor
                if progress is not None:
                    progress(done, len(specs))
            cast.wait()
    return target


def _convert_pickle(source: Path, target: Path, dtype: str, cast_to: str | None,
                    progress: ProgressCallback | None, cast: _Cast) -> Path:
    from mergekit_sd.io.pickled import load_pickle_checkpoint

    checkpoint = load_pickle_checkpoint(source)
    tensors = checkpoint.tensors
    _check_names(source, tensors)
    target_torch = torch_dtype(cast_to) if cast_to is not None else None
    specs = []
    for name, tensor in tensors.items():
        try:
            stored = safetensors_dtype(tensor.dtype)
        except ValueError:
            raise BadModelFile(source, f"tensor {name!r} has dtype {tensor.dtype}, which "
                                       "safetensors cannot store") from None
        specs.append(TensorSpec(name, _out_dtype(stored, cast_to), tuple(tensor.shape)))
    metadata = _metadata({}, source, dtype)
    with StreamingWriter(target, specs, metadata) as writer:
        for done, name in enumerate(list(tensors), start=1):
            # pop: once written, a tensor (and, with its last view, its storage) can be freed.
            tensor = tensors.pop(name)
            if tensor.is_floating_point():
                tensor = cast(name, tensor, tensor.dtype if target_torch is None
                              else target_torch)
            writer.write(name, tensor)  # contiguous copy: views never share bytes on disk
            del tensor
            if progress is not None:
                progress(done, len(specs))
        cast.wait()
    return target


def _check_names(source: Path, tensors: dict) -> None:
    """Names a pickle allows and a safetensors header cannot hold: its metadata key, and text
    that is not valid UTF-8 (lone surrogates)."""
    for name in tensors:
        if name == "__metadata__":
            raise BadModelFile(source, "tensor '__metadata__' cannot be stored under that name "
                                       "in safetensors (the name of its metadata)")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "replace").decode()
            raise BadModelFile(source, f"the tensor name {shown!r} is not valid UTF-8 (a lone "
                                       "surrogate), which safetensors needs") from None
