"""Run a merge plan: stream key by key through the recipe's steps into every candidate's file.

For each key, the inputs' tensors are read (prefetched by a small thread pool while the previous
key is computed), converted to fp32 on the chosen device, passed through the steps in order for
each candidate, cast to the output dtype and written straight into that candidate's file. Peak
memory is a few copies of the largest tensor, never a model. Outputs are NAME.partial until
every tensor is written and fsynced; cancellation or an error removes them.
"""

from __future__ import annotations

import contextlib
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergekit_sd.errors import UserError
from mergekit_sd.io.dtypes import torch_dtype
from mergekit_sd.io.hashing import file_sha256, legacy_model_hash
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.writer import StreamingWriter
from mergekit_sd.merge.plan import KeyTask, MergePlan, vae_source_keys
from mergekit_sd.merge.provenance import merge_metadata
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress
from mergekit_sd.recipe.params import Candidate

PREFETCH = 2  # keys read ahead of the one being computed


def hash_inputs(plan: MergePlan, progress: ProgressCallback, cancel: CancelToken
                ) -> tuple[dict[str, str], dict[str, str]]:
    """SHA256 (and A1111 legacy hash) of every input, in parallel; known hashes are reused."""
    files = dict(plan.inputs)
    if plan.vae is not None:
        files["vae"] = plan.vae
    total = sum(p.header.file_size for p in files.values() if not p.known_sha256)
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        progress("hashing", done[0], total)

    def one(planned) -> str:
        if planned.known_sha256:
            return planned.known_sha256
        return file_sha256(planned.path, on_bytes, lambda: cancel.cancelled)

    with ThreadPoolExecutor(max_workers=2) as pool:
        hashes = dict(zip(files, pool.map(one, files.values()), strict=True))
    cancel.raise_if_cancelled()
    for name, planned in files.items():
        if planned.expected_sha256 and planned.expected_sha256.lower() != hashes[name]:
            raise plan.loaded.error(("models", name),
                                    f"{planned.path.name} has SHA256 {hashes[name][:12]}…, not "
                                    f"the {planned.expected_sha256[:12]}… the recipe expects")
    legacy = {name: legacy_model_hash(p.path) for name, p in files.items()}
    return hashes, legacy


class _Inputs:
    """Open readers and the fetch of one key's tensors, run in the prefetch threads."""

    def __init__(self, plan: MergePlan, device: str):
        self.plan = plan
        self.device = device
        self.readers = {n: SafetensorsReader(p.path, p.header) for n, p in plan.inputs.items()}
        if plan.vae is not None:
            self.readers["vae"] = SafetensorsReader(plan.vae.path, plan.vae.header)
            prefix = next((c.prefix for c in plan.inputs[plan.model_order[0]].found.components
                           if c.slot == "vae"), "first_stage_model.")
            self.vae_keys = vae_source_keys(plan.vae, prefix)
        else:
            self.vae_keys = {}

    def fetch(self, task: KeyTask):
        import torch

        if not task.merge:
            source = task.sources[0]
            key = self.vae_keys.get(task.key, task.key) if source == "vae" else task.key
            reader = self.readers[source]
            if reader.tensors[key].dtype == task.out.dtype:
                return reader.read_bytes(key)
            return reader.read_tensor(key)
        return {name: self.readers[name].read_tensor(task.key).to(self.device, torch.float32)
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
    return values.get(plan.steps[-1].step.name)


def _collect_stats(plan: MergePlan, inputs: _Inputs, progress: ProgressCallback,
                   cancel: CancelToken) -> dict:
    """Whole-model statistics some methods need before any key can be merged (cosine)."""
    wanted = [sp for sp in plan.steps if sp.method.needs_stats]
    if not wanted:
        return {}
    from mergekit_sd.merge.methods.supermerger import cosine_key_stat

    stats_function = {"cosine": cosine_key_stat}.__getitem__
    stats = {}
    merge_tasks = [t for t in plan.tasks if t.merge]
    for sp in wanted:
        if any(i not in plan.inputs for i in sp.step.inputs):
            index = plan.loaded.recipe.steps.index(sp.step)
            raise plan.loaded.error(("steps", index, "inputs"),
                                    f"{sp.method.name} needs models as inputs, not earlier steps")
        measure = stats_function(sp.method.needs_stats)
        values = []
        for i, task in enumerate(merge_tasks):
            cancel.raise_if_cancelled()
            if all(name in task.sources for name in sp.step.inputs):
                tensors = inputs.fetch(task)
                values.append(measure(*(tensors[name] for name in sp.step.inputs)))
            progress(f"statistics for {sp.step.name}", i + 1, len(merge_tasks))
        stats[sp.step.name] = {"min": min(values, default=0.0), "max": max(values, default=0.0)}
    return stats


def run_merge(plan: MergePlan, device: str = "cpu", progress: ProgressCallback = no_progress,
              cancel: CancelToken | None = None) -> dict[str, Path]:
    """Write every candidate of the plan; returns candidate name -> file written."""
    import torch

    cancel = cancel or CancelToken()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available on this machine; "
                        "use --device cpu")
    hashes, legacy = hash_inputs(plan, progress, cancel)
    inputs = _Inputs(plan, device)
    specs = [t.out for t in plan.tasks]
    try:
        stats = _collect_stats(plan, inputs, progress, cancel)
        with contextlib.ExitStack() as stack:
            writers = {c.name: stack.enter_context(StreamingWriter(
                plan.outputs[c.name], specs, merge_metadata(plan, c, hashes, legacy)))
                for c in plan.candidates}
            _stream(plan, inputs, writers, stats, progress, cancel)
    finally:
        inputs.close()
    return dict(plan.outputs)


def _stream(plan: MergePlan, inputs: _Inputs, writers: dict[str, StreamingWriter], stats: dict,
            progress: ProgressCallback, cancel: CancelToken) -> None:
    tasks = plan.tasks
    with ThreadPoolExecutor(max_workers=PREFETCH) as pool:
        pending: deque = deque()
        next_index = 0
        for index, task in enumerate(tasks):
            while next_index < len(tasks) and next_index <= index + PREFETCH:
                pending.append(pool.submit(inputs.fetch, tasks[next_index]))
                next_index += 1
            fetched = pending.popleft().result()
            cancel.raise_if_cancelled()
            _write_key(plan, task, fetched, writers, stats)
            progress("merging", index + 1, len(tasks))


def _write_key(plan: MergePlan, task: KeyTask, fetched, writers: dict[str, StreamingWriter],
               stats: dict) -> None:
    if not task.merge:
        if isinstance(fetched, bytearray):
            for writer in writers.values():
                writer.write_bytes(task.key, fetched)
        else:
            out = _cast(fetched, task)
            for writer in writers.values():
                writer.write(task.key, out)
        return
    for cand in plan.candidates:
        result = _evaluate(plan, cand, task, fetched, stats)
        writers[cand.name].write(task.key, _cast(result, task))


def _cast(tensor, task: KeyTask):
    dtype = torch_dtype(task.out.dtype)
    if tensor.dtype == dtype and tensor.device.type == "cpu":
        return tensor
    return tensor.to("cpu").to(dtype) if tensor.is_floating_point() else tensor.to("cpu")
