"""Run a merge plan: stream key by key through the recipe's steps into every candidate's file.

Work is a list of items: a key, or a piece of a large key when every method on the way is
elementwise. A small thread pool reads (and converts to fp32) the next items while the current
one is computed; a single writer thread writes results behind. So peak memory is a few pieces,
never a model, and reading, computing and writing overlap. The inputs' SHA256s, which the output
header records, are computed by a background thread during the merge: the header is written
with same-length placeholders and filled in before the files are committed. Outputs are
NAME.partial until every tensor is written and fsynced; cancellation or an error removes them.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.errors import UserError
from mergekit_sd.io.dtypes import SAFETENSORS_DTYPES, torch_dtype
from mergekit_sd.io.hashing import file_sha256, legacy_model_hash
from mergekit_sd.io.nonfinite import NonFinite, all_finite, count_nonfinite
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.saturate import Clamped, checked_cast
from mergekit_sd.io.writer import StreamingWriter
from mergekit_sd.merge.plan import (
    CHUNK_ELEMENTS,
    PREFETCH,
    VAE_SOURCE,
    KeyTask,
    MergePlan,
    PlannedInput,
)
from mergekit_sd.merge.provenance import merge_metadata
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress
from mergekit_sd.recipe.params import Candidate

WRITE_BEHIND = 4  # results queued for the writer thread before computing waits


@dataclass(frozen=True)
class WorkItem:
    task: KeyTask
    first: int  # first element (of the flattened tensor)
    count: int
    whole: bool  # the whole tensor, in its shape (else a flat piece)


def _sources_match_output(plan: MergePlan, task: KeyTask) -> bool:
    for name in task.sources:
        if name == VAE_SOURCE:
            info = plan.vae.header.tensors[plan.vae_keys[task.key]]
        else:
            info = plan.inputs[name].header.tensors[task.key]
        if info.shape != task.out.shape:
            return False
    return True


def work_items(plan: MergePlan) -> list[WorkItem]:
    """Split large tensors into pieces where that cannot change the result."""
    elementwise = all(sp.method.elementwise for sp in plan.steps)
    items = []
    for task in plan.tasks:
        numel = math.prod(task.out.shape)
        piecewise = (numel > CHUNK_ELEMENTS and (elementwise or not task.merge)
                     and _sources_match_output(plan, task))
        if not piecewise:
            items.append(WorkItem(task, 0, numel, True))
            continue
        for first in range(0, numel, CHUNK_ELEMENTS):
            items.append(WorkItem(task, first, min(CHUNK_ELEMENTS, numel - first), False))
    return items


class _Inputs:
    """Open readers, and the fetch of one work item's tensors (run in the prefetch threads)."""

    def __init__(self, plan: MergePlan, device: str):
        self.device = device
        self.readers = {n: SafetensorsReader(p.path, p.header) for n, p in plan.inputs.items()}
        self.vae_keys = plan.vae_keys
        if plan.vae is not None:
            self.readers[VAE_SOURCE] = SafetensorsReader(plan.vae.path, plan.vae.header)

    def _read(self, source, key: str, item: WorkItem):
        reader = self.readers[source]
        if source == VAE_SOURCE:
            key = self.vae_keys[key]
        if item.whole:
            return reader.read_tensor(key)
        return reader.read_range(key, item.first, item.count)

    def fetch(self, item: WorkItem):
        import torch

        task = item.task
        if not task.merge:
            return self._read(task.sources[0], task.key, item)
        return {name: self._read(name, task.key, item).to(self.device, torch.float32)
                for name in task.sources}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def _overlap(args: list):
    """Slice same-rank tensors of different shapes to their common part; return the sliced
    arguments and a function putting a result back into a copy of the first argument."""
    shapes = {tuple(a.shape) for a in args}
    if len(shapes) == 1:
        return args, lambda result: result
    common = tuple(min(dims) for dims in zip(*shapes, strict=True))
    window = tuple(slice(0, d) for d in common)
    first = args[0]

    def restore(result):
        whole = first.clone()
        whole[window] = result
        return whole

    return [a[window] for a in args], restore


def _seed_for(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _evaluate(plan: MergePlan, cand: Candidate, task: KeyTask, tensors: dict, stats: dict):
    import torch

    values: dict = {}
    for sp in plan.steps:
        args = [values[i] if i in values else tensors.get(i) for i in sp.step.inputs]
        present = [a for a in args if a is not None]
        if not present:
            continue
        if len(present) < len(args):  # key missing in some inputs: first that has it
            values[sp.step.name] = present[0]
            continue
        params = {}
        for name, keyed in sp.params[cand.name].items():
            value = keyed.value(task.key, task.slot, task.block)
            if value is not None:
                params[name] = value
        if sp.method.stochastic:
            seed = params.get("seed", sp.method.params["seed"].default)
            params["generator"] = torch.Generator(device=present[0].device).manual_seed(
                _seed_for(seed, task.key))
        if sp.method.needs_stats:
            params["stats"] = stats[sp.step.name]
        args, restore = _overlap(args)
        values[sp.step.name] = restore(sp.method.func(*args, **params))
        if sp.lora_weights or sp.lora_biases:
            values[sp.step.name] = _bake(sp, task.key, values[sp.step.name])
    return values.get(plan.steps[-1].step.name)


def _bake(sp, key: str, tensor):
    from mergekit_sd.lora.bake import apply_loras, finite_or_clamped

    weights, biases = sp.lora_weights.get(key), sp.lora_biases.get(key)
    if not weights and not biases:
        return tensor
    baked = apply_loras(tensor.clone(), weights or biases, bias=not weights)
    finite_or_clamped(baked, weights or biases, key)  # NaN or ±inf: refused, naming the cause
    return baked


def _collect_stats(plan: MergePlan, inputs: _Inputs, progress: ProgressCallback,
                   cancel: CancelToken) -> dict:
    """Whole-model statistics some methods need before any key can be merged (cosine)."""
    wanted = [sp for sp in plan.steps if sp.method.needs_stats]
    if not wanted:
        return {}
    from mergekit_sd.merge.methods.supermerger import cosine_key_stat

    measures = {"cosine": cosine_key_stat}
    stats = {}
    merge_tasks = [t for t in plan.tasks if t.merge]
    for sp in wanted:  # their inputs are models (build_plan checks)
        measure = measures[sp.method.needs_stats]
        values = []
        for i, task in enumerate(merge_tasks):
            cancel.raise_if_cancelled()
            if all(name in task.sources for name in sp.step.inputs):
                item = WorkItem(task, 0, math.prod(task.out.shape), True)
                tensors = inputs.fetch(item)
                values.append(measure(*(tensors[name] for name in sp.step.inputs)))
            progress(f"statistics for {sp.step.name}", i + 1, len(merge_tasks))
        stats[sp.step.name] = {"min": min(values, default=0.0), "max": max(values, default=0.0)}
    return stats


class _Hasher:
    """SHA256 of every input on a background thread; known hashes (a catalog's) are reused."""

    def __init__(self, plan: MergePlan, progress: ProgressCallback, cancel: CancelToken):
        # by model name (inputs and LoRAs share the recipe's `models`), and VAE_SOURCE
        self.files: dict[str | tuple, PlannedInput] = dict(plan.inputs)
        self.files.update(plan.loras)
        if plan.vae is not None:
            self.files[VAE_SOURCE] = plan.vae
        self.stop = threading.Event()
        total = sum(p.path.stat().st_size for p in self.files.values() if not p.known_sha256)
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            progress("hashing", done[0], total)

        def run() -> dict:
            hashes = {}
            for name, planned in self.files.items():
                hashes[name] = (planned.known_sha256.lower() if planned.known_sha256 else
                                file_sha256(planned.path, on_bytes,
                                            lambda: self.stop.is_set() or cancel.cancelled))
            return hashes

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        self._future = self._pool.submit(run)
        # same length as a SHA256 and unlike any: the header is written with these first
        self.placeholders = {name: f"{'~' * 56}{i:08d}" for i, name in enumerate(self.files)}
        self.legacy = {name: legacy_model_hash(p.path) for name, p in self.files.items()}

    def result(self, plan: MergePlan, cancel: CancelToken) -> dict:
        hashes = self._future.result()
        cancel.raise_if_cancelled()
        for name, planned in self.files.items():
            if planned.expected_sha256 and planned.expected_sha256.lower() != hashes[name]:
                loc = ("output", "vae_sha256") if name == VAE_SOURCE else ("models", name)
                raise plan.loaded.error(
                    loc, f"{planned.path.name} has SHA256 {hashes[name][:12]}…, "
                         f"not the {planned.expected_sha256[:12]}… the recipe expects")
        return hashes

    def close(self) -> None:
        self.stop.set()
        self._pool.shutdown(wait=True)


def _check_device(device: str) -> None:
    """Merges run on the CPU or a CUDA device; torch's own refusals of others are tracebacks."""
    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device}: use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available on this machine; "
                        "use --device cpu")
    count = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= count:
        raise UserError(f"--device {device}: this machine has {count} CUDA device"
                        f"{'' if count == 1 else 's'}; use cuda:0 to cuda:{count - 1}")


def run_merge(plan: MergePlan, device: str = "cpu", progress: ProgressCallback = no_progress,
              cancel: CancelToken | None = None, clamped: Clamped | None = None,
              nonfinite: NonFinite | None = None) -> dict[str, Path]:
    """Write every candidate of the plan; returns candidate name -> file written. Values
    beyond the output dtype's range are clamped to it (never ±inf), counted in `clamped`;
    tensors written with NaN or ±inf are recorded in `nonfinite`, with the inputs holding
    such values there."""
    cancel = cancel or CancelToken()
    _check_device(device)
    inputs = _Inputs(plan, device)
    hasher = _Hasher(plan, progress, cancel)
    specs = [t.out for t in plan.tasks]
    try:
        stats = _collect_stats(plan, inputs, progress, cancel)
        with contextlib.ExitStack() as stack:
            writers = {c.name: stack.enter_context(StreamingWriter(
                plan.outputs[c.name], specs,
                merge_metadata(plan, c, hasher.placeholders, hasher.legacy)))
                for c in plan.candidates}
            _stream(plan, inputs, writers, stats, progress, cancel, clamped, nonfinite)
            hashes = hasher.result(plan, cancel)
            for cand in plan.candidates:
                writers[cand.name].rewrite_metadata(
                    merge_metadata(plan, cand, hashes, hasher.legacy))
    finally:
        hasher.close()
        inputs.close()
    return dict(plan.outputs)


def _prefetched(items: list[WorkItem], inputs: _Inputs, cancel: CancelToken):
    """(item, its inputs' tensors) in order, the next PREFETCH items read ahead on threads."""
    with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="read") as readers:
        pending: deque[Future] = deque()
        next_index = 0
        for index, item in enumerate(items):
            while next_index < len(items) and next_index <= index + PREFETCH:
                pending.append(readers.submit(inputs.fetch, items[next_index]))
                next_index += 1
            fetched = pending.popleft().result()
            cancel.raise_if_cancelled()
            yield item, fetched


def _stream(plan: MergePlan, inputs: _Inputs, writers: dict[str, StreamingWriter], stats: dict,
            progress: ProgressCallback, cancel: CancelToken, clamped: Clamped | None,
            nonfinite: NonFinite | None) -> None:
    keys_done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as writer_thread:
        writes: deque[Future] = deque()
        for item, fetched in _prefetched(work_items(plan), inputs, cancel):
            for job in _results(plan, item, fetched, stats, clamped, nonfinite):
                writes.append(writer_thread.submit(_write, writers, item, *job))
            while len(writes) > WRITE_BEHIND:
                writes.popleft().result()
            if item.first + item.count == math.prod(item.task.out.shape):
                keys_done += 1
                progress("merging", keys_done, len(plan.tasks))
        while writes:
            writes.popleft().result()


def _results(plan: MergePlan, item: WorkItem, fetched, stats: dict, clamped: Clamped | None,
             nonfinite: NonFinite | None = None):
    """(candidate or None for all, CPU tensor in the output dtype) for one work item."""
    task = item.task
    if not task.merge:
        value, finite = _cast(fetched, task, clamped, nonfinite is not None)
        if nonfinite is not None and not finite:
            _record(plan, nonfinite, task.key, value, [task.sources[0]], plan.candidates)
        yield None, value
        return
    for cand in plan.candidates:
        value, finite = _cast(_evaluate(plan, cand, task, fetched, stats), task, clamped,
                              nonfinite is not None)
        if nonfinite is not None and not finite:
            held = [name for name, tensor in fetched.items() if not all_finite(tensor)]
            _record(plan, nonfinite, task.key, value, held, [cand])
        yield cand.name, value


def _record(plan: MergePlan, nonfinite: NonFinite, key: str, tensor, sources: list,
            candidates) -> None:
    """Count a written tensor's NaN and ±inf, for each output it goes to."""
    nan, inf = count_nonfinite(tensor)
    names = [f"the VAE {plan.vae.path.name}" if s == VAE_SOURCE else f"input {s}"
             for s in sources]
    for cand in candidates:
        output = plan.outputs[cand.name].name if len(plan.candidates) > 1 else ""
        nonfinite.add(key, nan, inf, names, output)


def _write(writers: dict[str, StreamingWriter], item: WorkItem, candidate: str | None,
           tensor) -> None:
    import torch

    targets = writers.values() if candidate is None else (writers[candidate],)
    if item.whole:
        for writer in targets:
            writer.write(item.task.key, tensor)
        return
    itemsize = SAFETENSORS_DTYPES[item.task.out.dtype][0] // 8
    raw = tensor.contiguous().view(torch.uint8).numpy()
    for writer in targets:
        writer.write_part(item.task.key, item.first * itemsize, raw)


def _cast(tensor, task: KeyTask, clamped: Clamped | None, check: bool = False):
    """(the CPU tensor in the output dtype, whether it is finite: told only with `check`);
    narrowing clamps finite values instead of making ±inf."""
    dtype = torch_dtype(task.out.dtype)
    tensor = tensor.to("cpu")
    if not tensor.is_floating_point():
        return tensor, True
    return checked_cast(tensor, dtype, task.key, clamped, check)


def candidate_tensors(plan: MergePlan, candidate: str, device: str = "cpu",
                      cancel: CancelToken | None = None, clamped: Clamped | None = None
                      ) -> Iterator[tuple[str, object]]:
    """Yield one candidate's output tensors, key by key in file order, exactly as `run_merge`
    writes them (the same pieces, the same output dtype), without writing a file: rendering
    merges a sweep's candidates straight into a pipeline's memory this way."""
    import torch

    cancel = cancel or CancelToken()
    cand = next((c for c in plan.candidates if c.name == candidate), None)
    if cand is None:
        raise UserError(f"the recipe has no candidate {candidate!r} (candidates: "
                        f"{', '.join(c.name for c in plan.candidates)})")
    inputs = _Inputs(plan, device)
    try:
        stats = _collect_stats(plan, inputs, no_progress, cancel)
        whole = None
        for item, fetched in _prefetched(work_items(plan), inputs, cancel):
            task = item.task
            value = _cast(_evaluate(plan, cand, task, fetched, stats) if task.merge
                          else fetched, task, clamped)[0]
            if item.whole:
                yield task.key, value
                continue
            if item.first == 0:  # a large key computed in pieces: gather it
                whole = torch.empty(math.prod(task.out.shape), dtype=value.dtype)
            whole[item.first:item.first + item.count] = value
            if item.first + item.count == whole.numel():
                yield task.key, whole.reshape(task.out.shape)
    finally:
        inputs.close()
