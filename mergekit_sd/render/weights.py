"""Copy checkpoint tensors into a pipeline's parameters, in place, through a precomputed key map.

A pipeline is built once per architecture with empty parameters (`empty_parameters`), then
filled from a file or from tensors a merge computes in memory. `WeightTable` is the key map
resolved against the live modules: for every checkpoint key, the parameters (and which rows of
them) it fills. Swapping a candidate is then one pass of `param.data[rows].copy_(tensor[rows])`;
nothing is allocated or rebuilt, so it costs about what reading the weights costs. On the CPU,
a parameter in the file's own dtype is not even copied: it takes the file's mapped pages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.arch.keymap import Source
from mergekit_sd.errors import UserError
from mergekit_sd.io.mapped import MappedTensors
from mergekit_sd.io.reader import SafetensorsReader


@contextlib.contextmanager
def empty_parameters():
    """Construct modules with their parameters on the meta device (no memory, no random init).

    Buffers stay real: CLIP's position ids and similar non-persistent buffers are computed at
    construction and are not in checkpoints. The same approach as accelerate's
    `init_empty_weights`; it swaps `Module.register_parameter` while active, so build models
    in one thread at a time.
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:  # tied weights arrive on meta already
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def materialize(module, device: str, dtype) -> None:
    """Give every meta parameter real (uninitialised) storage; move buffers alongside. Tied
    parameters (T5's shared and encoder embeddings) stay one parameter."""
    import torch

    made: dict[int, object] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    target = dtype if param.is_floating_point() else param.dtype
                    made[id(param)] = torch.nn.Parameter(
                        torch.empty(param.shape, dtype=target, device=device),
                        requires_grad=False)
                sub._parameters[name] = made[id(param)]
    module.to(device)
    module.requires_grad_(False)
    module.eval()


@dataclass(frozen=True, slots=True)
class _Fill:
    """Rows [start, stop) of a checkpoint key go to rows [offset, offset + stop - start) of
    `param` (to its columns when `transposed`)."""

    param: object  # torch.nn.Parameter
    rows: int  # rows of `param` as the key map counts them
    offset: int
    start: int
    stop: int
    transposed: bool
    whole: bool  # the key fills the whole parameter with the same element order


def _parameter(module, name: str):
    """The parameter called `name`, or None when the model has no such parameter.

    transformers' CLIPTextModel keeps no `text_model.` in its state dict names while the key
    maps (and CLIPTextModelWithProjection) do, so both spellings are tried."""
    for candidate in (name, name.removeprefix("text_model.")):
        owner, _, leaf = candidate.rpartition(".")
        try:
            sub = module.get_submodule(owner) if owner else module
        except AttributeError:
            continue
        param = sub._parameters.get(leaf)
        if param is not None:
            return param
        base = getattr(sub, "base_layer", None)  # a PEFT LoRA wrapper once a LoRA is loaded
        if base is not None and base._parameters.get(leaf) is not None:
            return base._parameters[leaf]
    return None


class WeightTable:
    """For every checkpoint key, the parameters it fills; built once per pipeline."""

    def __init__(self, modules: Mapping[str, object], maps: Mapping[str, Mapping[str, Source]],
                 key_shapes: Mapping[str, tuple[int, ...]]):
        self.by_key: dict[str, list[_Fill]] = {}
        self.params: dict[tuple[str, str], object] = {}
        self.mismatched: list[tuple[str, int, int]] = []  # (name, parameter size, file's)
        for component, mapping in maps.items():
            module = modules.get(component)
            if module is None:
                continue
            for name, source in mapping.items():
                param = _parameter(module, name)
                if param is None:  # buffers (position ids) and unused keys stay as built
                    continue
                size = _source_numel(source, key_shapes)
                if size != param.numel():
                    self.mismatched.append((f"{component}.{name}", param.numel(), size))
                    continue
                self.params[(component, name)] = param
                self._add(param, source, key_shapes)
        self.missing = self._unfilled(modules)

    def _add(self, param, source: Source, key_shapes) -> None:
        rows = sum(seg.stop - seg.start for seg in source.segments)
        offset = 0
        for seg in source.segments:
            shape = key_shapes[seg.key]
            whole = (len(source.segments) == 1 and not source.transposed
                     and seg.start == 0 and seg.stop == (shape[0] if shape else 1)
                     and _numel(shape) == param.numel())
            self.by_key.setdefault(seg.key, []).append(
                _Fill(param, rows, offset, seg.start, seg.stop, source.transposed, whole))
            offset += seg.stop - seg.start

    def _unfilled(self, modules: Mapping[str, object]) -> dict[str, list[str]]:
        """Parameters no checkpoint key fills, per component."""
        filled = {id(p) for p in self.params.values()}
        missing = {}
        for component, module in modules.items():
            names = [n for n, p in module.named_parameters()
                     if id(p) not in filled and not _is_adapter(n)]
            if names:
                missing[component] = names
        return missing

    def keys(self) -> list[str]:
        return list(self.by_key)

    def required_missing(self) -> dict[str, list[str]]:
        """Unfilled parameters that have no neutral value (the file is incomplete)."""
        missing = {c: [n for n in names if _neutral(n) is None]
                   for c, names in self.missing.items()}
        return {c: names for c, names in missing.items() if names}

    def reset_unfilled(self, modules: Mapping[str, object]) -> int:
        """Give the parameters this file lacks their neutral value, so a candidate without
        them never keeps the previous candidate's; returns how many were reset."""
        count = 0
        for component, names in self.missing.items():
            for name in names:
                neutral = _neutral(name)
                if neutral is not None:
                    neutral(modules[component].get_parameter(name).data)
                    count += 1
        return count

    def _shareable(self, fill: _Fill, dtype, device: str) -> bool:
        data = fill.param.data
        return fill.whole and data.dtype == dtype and data.device.type == device == "cpu"

    def shares(self, key: str, file_dtype: str) -> bool:
        """Whether `copy(key, ..., share=True)` of a CPU tensor in `file_dtype` copies
        nothing."""
        from mergekit_sd.io.dtypes import torch_dtype

        dtype = torch_dtype(file_dtype)
        return all(self._shareable(f, dtype, "cpu") for f in self.by_key.get(key, ()))

    def copy(self, key: str, tensor, share: bool = False) -> None:
        """Copy one checkpoint tensor into every parameter it feeds. With `share`, a parameter
        the tensor fills whole, in the same dtype and on the CPU, takes the tensor's memory
        itself instead of a copy (the tensor must never be written by anyone else)."""
        for fill in self.by_key.get(key, ()):
            data = fill.param.data
            if share and self._shareable(fill, tensor.dtype, tensor.device.type):
                fill.param.data = tensor.reshape(data.shape)
                continue
            if fill.whole:  # non_blocking: a device copy overlaps reading the next tensor
                data.copy_(tensor.reshape(data.shape), non_blocking=True)
                continue
            part = (tensor.reshape(tensor.shape[0] if tensor.ndim else 1, -1)
                    [fill.start:fill.stop])
            if fill.transposed:
                data[:, fill.offset:fill.offset + part.shape[0]].copy_(part.T, non_blocking=True)
            else:
                rows = data.view(fill.rows, -1)
                rows[fill.offset:fill.offset + part.shape[0]].copy_(part, non_blocking=True)

    @property
    def on_accelerator(self) -> bool:
        return any(p.device.type != "cpu" for p in self.params.values())


# Weights some releases leave out, and what stands for them (as ComfyUI does): text encoders'
# final layer norms are an identity norm, and a missing text projection the identity matrix.
_NEUTRAL = {
    "final_layer_norm.weight": lambda t: t.fill_(1.0),
    "final_layer_norm.bias": lambda t: t.zero_(),
    "text_projection.weight": lambda t: t.copy_(_eye(t)),
}


def _is_adapter(name: str) -> bool:
    """A fused LoRA's own parameters (PEFT's lora_A, lora_B ...): no checkpoint has them."""
    return any(part.startswith("lora_") for part in name.split("."))


def _neutral(name: str):
    return next((fill for suffix, fill in _NEUTRAL.items() if name.endswith(suffix)), None)


def _eye(t):
    import torch

    return torch.eye(*t.shape, dtype=t.dtype, device=t.device)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _source_numel(source: Source, key_shapes) -> int:
    """Elements of the diffusers tensor `source` describes: its rows times a row's size."""
    total = 0
    for seg in source.segments:
        shape = key_shapes[seg.key]
        total += (seg.stop - seg.start) * (_numel(shape[1:]) if shape else 1)
    return total


def load_file(table: WeightTable, path: Path, keys: Iterable[str] | None = None,
              share: bool = True) -> int:
    """Fill the table's parameters from a safetensors file; returns how many keys were copied.

    `keys` limits the copy (a swap of the diffusion model alone). For CPU parameters the file
    is memory-mapped copy-on-write: a parameter in the file's dtype that a key fills whole
    simply uses the mapped bytes (no copy: the pages are the page cache's until something, such
    as fusing a LoRA, writes to them, which then gets a private copy), and the others are
    copied (and converted) straight out of the mapping. `share=False` copies every parameter:
    for weights about to be written anyway (a LoRA fused again after the swap), a private copy
    made in one pass is far cheaper than a copy-on-write fault per page. For an accelerator,
    tensors are read into pinned buffers that the device copies from."""
    wanted = [k for k in (table.keys() if keys is None else keys) if k in table.by_key]
    with SafetensorsReader(path) as reader:
        absent = [k for k in wanted if k not in reader]
        if absent:
            raise UserError(f"{path}: has no tensor {absent[0]!r} (and {len(absent) - 1} more) "
                            "that the pipeline's first checkpoint had; render checkpoints of "
                            "the same architecture and layout together")
        if table.on_accelerator:
            staging = _Staging(reader, wanted)
            for key in wanted:
                table.copy(key, staging.read(key))
                staging.copied()
            staging.finish()
        else:
            mapped = MappedTensors(reader)
            # the copies read every page of their keys: map those pages in one call (far
            # cheaper than a fault each); shared pages are read where the render first uses
            # them, as with diffusers' own loading
            mapped.populate(k for k in wanted
                            if not (share and table.shares(k, reader.tensors[k].dtype)))
            for key in wanted:
                table.copy(key, mapped.tensor(key), share=share)
    return len(wanted)


class _Staging:
    """Two pinned buffers tensors are read into before their copy to the device, reused for
    every key: the next tensor is read while the device still copies the last one, and an
    event says when a buffer is free again."""

    def __init__(self, reader: SafetensorsReader, keys: list[str]):
        import torch

        self.reader = reader
        largest = max((reader.tensors[k].nbytes for k in keys), default=0)
        self.buffers = [torch.empty(largest, dtype=torch.uint8, pin_memory=True)
                        for _ in range(2)]
        self.events: list = [None, None]
        self.turn = 0

    def read(self, key: str):
        from mergekit_sd.io.dtypes import torch_dtype

        slot = self.turn % 2
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        info = self.reader.tensors[key]
        buffer = self.buffers[slot][:info.nbytes]
        if info.nbytes:
            self.reader.read_into(key, buffer.numpy())
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def copied(self) -> None:
        """The device copy out of the buffer just read has been issued."""
        import torch

        event = torch.cuda.Event()
        event.record()
        self.events[self.turn % 2] = event
        self.turn += 1

    def finish(self) -> None:
        for event in self.events:
            if event is not None:
                event.synchronize()


def load_tensors(table: WeightTable, tensors: Iterable[tuple[str, object]]) -> int:
    """Fill the table's parameters from (checkpoint key, tensor) pairs, e.g. a merge computed
    in memory; keys the pipeline does not use are skipped. Returns how many were copied."""
    copied = 0
    for key, tensor in tensors:
        if key in table.by_key:
            table.copy(key, tensor)
            copied += 1
    return copied
