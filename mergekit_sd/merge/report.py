"""Show a merge plan (`mergekit-sd plan`) to people and to scripts."""

from __future__ import annotations

import functools

from mergekit_sd.arch.architectures import Architecture
from mergekit_sd.arch.components import TEXT_ENCODER_SLOTS, text_encoder_names
from mergekit_sd.merge.plan import ASSUMED_DISK_BYTES_PER_S, MergePlan
from mergekit_sd.merge.registry import unrecorded_draws
from mergekit_sd.recipe.params import KeyedValue


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(keyed: KeyedValue, arch: Architecture) -> str:
    parts = [] if keyed.default is None else [_short(keyed.default)]
    if keyed.by_block:
        parts.append("blocks " + " ".join(f"{b}={_short(v)}" for b, v in keyed.by_block.items()))
    # slots by the names recipes use for this architecture (FLUX's T5 is text_encoder_2),
    # leaving out text encoder slots it does not have
    names = {slot: name for name, slot, _ in text_encoder_names(arch.id, arch.family)}
    shown = {names.get(s, s): v for s, v in keyed.by_slot.items()
             if s in names or s not in TEXT_ENCODER_SLOTS}
    if shown:
        parts.append("components " + " ".join(f"{s}={v}" for s, v in shown.items()))
    if keyed.by_pattern:
        parts.append("keys " + " ".join(f"{p}={v}" for p, _, v in keyed.by_pattern))
    return "; ".join(parts) or "method default"


def plan_as_dict(plan: MergePlan) -> dict:
    merged = sum(t.merge for t in plan.tasks)
    data = {
        "recipe": str(plan.loaded.path),
        "architecture": plan.arch.id,
        "inputs": [{"name": p.name, "ref": p.ref, "path": str(p.path), "label": p.found.label,
                    "architecture": p.found.architecture, "file_size": p.header.file_size}
                   for p in plan.inputs.values()],
        "steps": [{"name": sp.step.name, "method": sp.method.name, "formula": sp.method.formula,
                   "inputs": sp.step.inputs,
                   "params": {c: {**{p: _describe(v, plan.arch) for p, v in params.items()},
                                  # what a stochastic step draws with, though left unsaid
                                  **{p: f"{v} (default)" for p, v
                                     in unrecorded_draws(sp.method, params).items()}}
                              for c, params in sp.params.items()}}
                  for sp in plan.steps],
        "candidates": {c.name: str(plan.outputs[c.name]) for c in plan.candidates},
        "keys": {"total": len(plan.tasks), "merged": merged, "copied": len(plan.tasks) - merged},
        "blocks": _block_coverage(plan),
        "notes": plan.notes,
        "output_bytes": plan.output_bytes,
        "estimated_peak_bytes": plan.estimated_peak_bytes(),
        "estimated_seconds": round(plan.estimated_seconds(), 1),
    }
    _add_loras(plan, data)
    return data


def _add_loras(plan: MergePlan, data: dict) -> None:
    """The LoRAs of bake_lora steps: among the inputs (what they are, their size), and with
    each step, how strongly each is baked."""
    data["inputs"] += [{"name": lora.name, "ref": lora.ref, "path": str(lora.path),
                        "label": lora.label, "architecture": plan.arch.id,
                        "file_size": lora.file_size, "lora": True}
                       for lora in plan.loras.values()]
    for step, sp in zip(data["steps"], plan.steps, strict=True):
        if sp.step.loras:
            step["loras"] = [spec.model_dump() for spec in sp.step.loras]


def _loras_text(step: dict) -> str:
    """"character: strength 0.8, te_strength 0.5; style: strength 0.6, blocks IN*=0.5 ..."."""
    return "; ".join(f"{lora['model']}: " + ", ".join(
        f"{field} {_value_text(lora[field])}" for field in ("strength", "te_strength", "blocks")
        if lora[field] is not None) for lora in step.get("loras", ()))


def _value_text(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_value_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_value_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def note_lines(plan: MergePlan) -> list[str]:
    """The plan's notes as `plan` prints them and `merge` says them on stderr before its work:
    mismatches between the inputs, keys dropped or baked, values that select no key (these as
    warnings)."""
    unused = set(plan.unused)
    return [f"{'warning' if note in unused else 'note'}: {note}" for note in plan.notes]


def _block_coverage(plan: MergePlan) -> dict[str, int]:
    counts = dict.fromkeys(plan.arch.blocks, 0)
    for task in plan.tasks:
        if task.merge:
            counts[task.block] = counts.get(task.block, 0) + 1
    return counts


def show_plan(plan: MergePlan) -> None:
    from rich.table import Table

    from mergekit_sd.data_console import data_console
    from mergekit_sd.inspect_view import human_size

    data = plan_as_dict(plan)
    # paths whole when piped (`plan r.yaml | grep`); file names and formulas printed as they
    # are, never as markup; messages soft-wrapped, so a path copied out of a terminal is whole
    console = data_console()
    say = functools.partial(console.print, soft_wrap=True)
    inputs = Table(title=f"inputs ({plan.arch.label})", title_justify="left")
    for column in ("name", "file", "what it is", "size"):
        inputs.add_column(column, overflow="fold")
    for p in plan.inputs.values():
        inputs.add_row(p.name, str(p.path), p.found.label, human_size(p.header.file_size))
    for lora in plan.loras.values():
        inputs.add_row(lora.name, str(lora.path), lora.label, human_size(lora.file_size))
    if plan.vae is not None:
        inputs.add_row("(vae)", str(plan.vae.path), plan.vae.found.label,
                       human_size(plan.vae.header.file_size))
    console.print(inputs)
    steps = Table(title="steps", title_justify="left")
    for column in ("step", "method", "inputs", "candidate", "parameters"):
        steps.add_column(column, overflow="fold")
    for step in data["steps"]:
        for cand, params in step["params"].items():
            text = ", ".join(f"{p}: {v}" for p, v in params.items()) or _loras_text(step) \
                or "defaults"
            steps.add_row(step["name"], f"{step['method']}\n{step['formula']}",
                          ", ".join(step["inputs"]), cand, text)
    console.print(steps)
    blocks = " ".join(f"{b}:{n}" for b, n in data["blocks"].items())
    keys = data["keys"]
    say(f"keys: {keys['total']} ({keys['merged']} merged, {keys['copied']} copied); "
        f"merged keys per block: {blocks}")
    for line in note_lines(plan):
        say(line)
    for cand, path in data["candidates"].items():
        # the header (key names, metadata, the recipe) comes on top: a few KB to a few MB
        say(f"output {cand} -> {path} ({human_size(plan.output_bytes)} of tensor data)")
    say(f"estimated peak memory {human_size(data['estimated_peak_bytes'])}; "
        f"estimated time {data['estimated_seconds']} s at an assumed "
        f"{ASSUMED_DISK_BYTES_PER_S / 1e6:.0f} MB/s disk (reads "
        f"{human_size(plan.read_bytes)} incl. hashing, writes "
        f"{human_size(plan.output_bytes * len(plan.candidates))} of tensor data)")
