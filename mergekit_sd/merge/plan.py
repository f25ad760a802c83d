"""Turn a recipe into a merge plan from headers alone: inputs, keys, mismatches, outputs, costs.

`mergekit-sd plan` prints this; `mergekit-sd merge` executes it. Nothing here reads tensor data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.arch.architectures import ARCHITECTURES, Architecture
from mergekit_sd.arch.components import SCHEDULE_KEYS, slot_in_file, slot_of
from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.dtypes import FLOAT_DTYPES, USER_DTYPES
from mergekit_sd.io.header import SafetensorsHeader, read_header
from mergekit_sd.io.writer import TensorSpec, check_output_path, same_file
from mergekit_sd.merge.facts import agreed_facts
from mergekit_sd.merge.plan_notes import idle_draws_text, unused_parts_text, value_options
from mergekit_sd.merge.registry import MergeMethod, check_params, get_method
from mergekit_sd.recipe.loader import LoadedRecipe
from mergekit_sd.recipe.params import (
    Candidate,
    KeyedValue,
    candidates,
    check_sweeps,
    resolve_param,
)
from mergekit_sd.recipe.refs import NoResolver, Resolver, is_path_ref, resolve_path
from mergekit_sd.recipe.schema import ParamSpec, Step

# FLUX dev, schnell and Fill share every block; merging them is common practice.
_COMPATIBLE_FAMILIES = {"flux"}
# Assumed for the time estimate only: a SATA SSD's sequential rate (say so when printing).
ASSUMED_DISK_BYTES_PER_S = 500e6
TORCH_BASELINE_BYTES = 250e6  # resident size of an imported torch before any tensor
# The executor's streaming granularity, here so the estimate and the executor agree.
PREFETCH = 2  # work items read ahead of the one being computed
# A piece of a large tensor: 4 MB in fp32. Bigger pieces buy no speed here, and glibc keeps
# freed pieces of every thread's arena resident, so they cost memory.
CHUNK_ELEMENTS = 1 << 20
# The baked VAE (output.vae) among the files a merge reads: the source of its keys, its reader,
# its SHA256. Not text, so that a model named "vae" (any name is text) never takes its place.
VAE_SOURCE = ("output", "vae")


@dataclass
class PlannedInput:
    name: str
    ref: str
    path: Path
    header: SafetensorsHeader
    found: Identification
    expected_sha256: str | None  # from the recipe: checked before writing
    known_sha256: str | None  # from the resolver (catalog cache): no need to hash


@dataclass
class KeyTask:
    key: str
    slot: str
    block: str
    out: TensorSpec
    sources: tuple  # models (in merge order) that have the key, or (VAE_SOURCE,)
    merge: bool  # False: copied as is from `sources[0]`


@dataclass
class StepPlan:
    step: Step
    method: MergeMethod
    # candidate name -> param name -> per-key value
    params: dict[str, dict[str, KeyedValue]]
    # bake_lora: checkpoint key -> the LoRA modules that change it (weights, then biases)
    lora_weights: dict = field(default_factory=dict)
    lora_biases: dict = field(default_factory=dict)


@dataclass
class PlannedLora:
    name: str  # under `models`
    ref: str
    path: Path
    expected_sha256: str | None
    known_sha256: str | None
    label: str = ""  # what it is ("kohya LoRA for SD1.x"), for `plan`
    file_size: int = 0


@dataclass
class MergePlan:
    loaded: LoadedRecipe
    arch: Architecture
    diffusion_prefix: str
    inputs: dict[str, PlannedInput]
    model_order: list[str]
    steps: list[StepPlan]
    candidates: list[Candidate]
    outputs: dict[str, Path]  # candidate name -> output path
    tasks: list[KeyTask]
    vae: PlannedInput | None = None
    vae_keys: dict[str, str] = field(default_factory=dict)  # output key -> key in the VAE file
    notes: list[str] = field(default_factory=list)
    loras: dict[str, PlannedLora] = field(default_factory=dict)  # bake_lora steps' LoRAs
    # metadata facts (modelspec.prediction_type ...) every input agrees on: the output's too
    carried: dict[str, str] = field(default_factory=dict)
    # per-component, per-block and per-key values that select no key (also in notes)
    unused: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(t.out.nbytes for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(p.header.data_bytes for p in self.inputs.values()) + \
            sum(lora.file_size for lora in self.loras.values())  # read whole, and hashed

    def estimated_peak_bytes(self) -> int:
        """Working set above torch's own size: fp32 copies of one piece (or of the largest
        tensor, when a method needs whole tensors) per input and per result, for the item
        being computed and those read ahead; doubled for what the allocator keeps resident."""
        largest = max((math.prod(t.out.shape) for t in self.tasks if t.merge), default=0)
        if all(sp.method.elementwise for sp in self.steps):
            largest = min(largest, CHUNK_ELEMENTS)
        live = len(self.inputs) + len(self.steps) * len(self.candidates) + len(self.candidates)
        return int(TORCH_BASELINE_BYTES + 2 * (PREFETCH + 1) * live * largest * 4)

    def estimated_seconds(self) -> float:
        moved = self.read_bytes + self.output_bytes * len(self.candidates)
        return moved / ASSUMED_DISK_BYTES_PER_S


def _model_order(loaded: LoadedRecipe) -> list[str]:
    """Models in depth-first order of the final step's inputs: the first one that has a key
    gives the output its shape and its fallback value."""
    recipe = loaded.recipe
    by_name = {s.name: s for s in recipe.steps}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in by_name:
            for child in by_name[name].inputs:
                visit(child)
        elif name not in order:
            order.append(name)

    visit(recipe.final_step.name)
    return order


def _locate(loaded: LoadedRecipe, name: str, resolver: Resolver) -> tuple[Path, str | None]:
    """(path, SHA256 when the resolver knows it) of model `name`."""
    ref = loaded.recipe.model_ref(name)
    loc = ("models", name)
    if is_path_ref(ref.ref):
        path = resolve_path(ref.ref, loaded.path.parent)
        if not path.exists():
            raise loaded.error(loc, f"model file {str(path)!r} does not exist")
        return path, None
    try:
        resolved = resolver(ref.ref)
    except LookupError as exc:
        raise loaded.error(loc, str(exc.args[0])) from None
    return resolved.path, resolved.sha256


def _open_input(loaded: LoadedRecipe, name: str, resolver: Resolver) -> PlannedInput:
    ref = loaded.recipe.model_ref(name)
    loc = ("models", name)
    path, known = _locate(loaded, name, resolver)
    try:
        header = read_header(path)
    except BadModelFile as exc:
        raise loaded.error(loc, f"{path.name}: {exc.problem}") from None
    found = identify(header)
    if found.kind == "lora":
        raise loaded.error(loc, f"{path.name} is a LoRA ({found.label}); bake it with a "
                                "bake_lora step instead of merging it as a model")
    if found.kind not in ("checkpoint", "diffusion_model"):
        raise loaded.error(loc, f"{path.name} is {found.label}, not a checkpoint or diffusion "
                                "model; use output.vae to bake a VAE")
    return PlannedInput(name, ref.ref, path, header, found, ref.sha256, known)


def _check_compatible(loaded: LoadedRecipe, inputs: dict[str, PlannedInput]) -> tuple[str, str]:
    first = next(iter(inputs.values()))
    first_prefix = _diffusion_prefix(first)
    for other in list(inputs.values())[1:]:
        a, b = ARCHITECTURES[first.found.architecture], ARCHITECTURES[other.found.architecture]
        same = a.id == b.id or (a.family == b.family and a.family in _COMPATIBLE_FAMILIES)
        if not same:
            raise loaded.error(("models", other.name),
                               f"{other.path.name} is {b.label} but {first.path.name} is "
                               f"{a.label}; models of different architectures cannot be merged")
        if _diffusion_prefix(other) != first_prefix:
            raise loaded.error(("models", other.name),
                               f"{other.path.name} stores its diffusion model under "
                               f"{_diffusion_prefix(other)!r} but {first.path.name} under "
                               f"{first_prefix!r}; give files of the same key layout")
    return first.found.architecture, first_prefix


_VARIANT_TEXT = {"inpainting": "an inpainting model", "instruct-pix2pix": "an instruct-pix2pix "
                 "model", "fill": "a FLUX.1 Fill model", "depth/canny": "a Depth/Canny model"}


def _check_variants(loaded: LoadedRecipe, inputs: dict[str, PlannedInput], order: list[str]
                    ) -> None:
    """A model whose first layer takes extra inputs (inpainting's 9-channel conv_in, Fill's
    mask latents) merges only as the first input, as AUTOMATIC1111 and supermerger require:
    the output takes the first input's shapes, so behind a normal model the extra channels
    would be dropped and the result could no longer inpaint."""
    first = inputs[order[0]]
    for name in order[1:]:
        variant = inputs[name].found.variant
        if variant is None or variant == first.found.variant:
            continue
        what = _VARIANT_TEXT.get(variant, f"a {variant} model")
        theirs = _VARIANT_TEXT.get(first.found.variant, "a normal model")
        raise loaded.error(("models", name),
                           f"{inputs[name].path.name} is {what} but {first.path.name} "
                           f"({first.name}), whose shapes the output takes, is {theirs}: its "
                           f"extra input channels would be dropped; list {name} first (as A), as "
                           "AUTOMATIC1111 and supermerger require")


def _diffusion_prefix(planned: PlannedInput) -> str:
    return next(c.prefix for c in planned.found.components if c.slot == "diffusion_model")


def _plan_steps(loaded: LoadedRecipe, steps: list[Step], arch: Architecture,
                cands: list[Candidate]) -> list[StepPlan]:
    plans = []
    for step in steps:
        index = loaded.recipe.steps.index(step)
        loc = ("steps", index)
        try:
            method = get_method(step.method)
        except UserError as exc:
            raise loaded.error((*loc, "method"), str(exc)) from None
        if method.variadic:
            ok = len(step.inputs) >= len(method.inputs) + 1
        else:
            ok = len(step.inputs) == len(method.inputs)
        if not ok:
            wanted = (f"at least {len(method.inputs) + 1}" if method.variadic
                      else str(len(method.inputs)))
            raise loaded.error((*loc, "inputs"), f"{method.name} takes {wanted} inputs "
                               f"({', '.join(method.inputs)}{', ...' if method.variadic else ''}),"
                               f" not {len(step.inputs)}")
        if method.needs_stats and any(i not in loaded.recipe.models for i in step.inputs):
            # its statistics are measured over whole input models before any key is merged
            raise loaded.error((*loc, "inputs"),
                               f"{method.name} needs models as inputs, not earlier steps")
        per_candidate = {}
        for cand in cands:
            values = {}
            for name, given in step.params.items():
                chosen = cand.value_of(step.name, name, given)
                values[name] = resolve_param(chosen, arch, (*loc, "params", name),
                                             loaded.error)
            _check_values(loaded, loc, method, values)
            per_candidate[cand.name] = values
        plans.append(StepPlan(step, method, per_candidate))
    return plans


def _check_values(loaded: LoadedRecipe, loc: tuple, method: MergeMethod,
                  values: dict[str, KeyedValue]) -> None:
    """Every value a parameter can take must pass the method's own checks."""
    for name, keyed in values.items():
        for where, option in value_options(keyed):
            if option is None:
                continue
            try:
                check_params(method, {name: option})
            except UserError as exc:
                hint = ""
                if not where and _looks_like_block_list(option):
                    hint = (f"; per-block values go under blocks, as in {name}: "
                            "{blocks: \"0,1,...\"} or {default: 0.5, blocks: out}")
                raise loaded.error((*loc, "params", name, *where), f"{exc}{hint}") from None


def _looks_like_block_list(value) -> bool:
    """Text a supermerger user may paste as a parameter: one value per block, or a preset."""
    from mergekit_sd.arch.block_lists import PRESETS

    return isinstance(value, str) and ("," in value or value.strip().lower() in PRESETS)


def _unused_selectors(loaded: LoadedRecipe, steps: list[StepPlan], tasks: list[KeyTask]
                      ) -> list[str]:
    """A sentence for each component, block or key pattern of a parameter that selects no key
    of the inputs (a typo, or a part these files lack): its value would be dropped unsaid."""
    slots, blocks = {t.slot for t in tasks}, {t.block for t in tasks}
    said, seen = [], set()
    for sp in steps:
        index = loaded.recipe.steps.index(sp.step)
        for values in sp.params.values():  # per candidate: a sweep has several
            for name, keyed in values.items():
                for kind, written, named in keyed.selectors:
                    loc = ("steps", index, "params", name, kind, written)
                    if loc in seen:
                        continue
                    seen.add(loc)
                    if kind == "keys":
                        pattern = next(p for w, p, _ in keyed.by_pattern if w == written)
                        hit = any(pattern.fullmatch(t.key) for t in tasks)
                    else:
                        hit = not (slots if kind == "components" else blocks).isdisjoint(named)
                    if not hit:
                        said.append(str(loaded.error(loc, "selects no key of the inputs, so "
                                                          "its value is never used")))
    return said


def _output_dtype(loaded: LoadedRecipe, source_dtype: str) -> str:
    wanted = loaded.recipe.output.dtype
    if source_dtype not in FLOAT_DTYPES or wanted == "keep":
        return source_dtype
    return USER_DTYPES[wanted]


def build_plan(loaded: LoadedRecipe, resolver: Resolver | None = None,
               out: Path | None = None, existing: str = "refuse") -> MergePlan:
    """The plan of `loaded`, from headers alone. `existing` says what to do with output files
    that exist: "refuse" them (a merge about to write), "replace" them (--overwrite), only
    "note" them (a plan shown writes nothing), or leave the outputs "unwritten": candidates
    rendered in memory never write them, so their paths are neither checked nor noted."""
    if existing not in ("refuse", "replace", "note", "unwritten"):
        raise ValueError(f"existing={existing!r}: use 'refuse', 'replace', 'note' or "
                         "'unwritten'")
    written = existing != "unwritten"
    recipe = loaded.recipe
    resolver = resolver or NoResolver()
    order = _model_order(loaded)
    inputs = {name: _open_input(loaded, name, resolver) for name in order}
    arch_id, prefix = _check_compatible(loaded, inputs)
    _check_variants(loaded, inputs, order)
    arch = ARCHITECTURES[arch_id]
    check_sweeps(recipe, loaded.error)
    cands = candidates(recipe)
    steps = _plan_steps(loaded, recipe.needed_steps, arch, cands)
    outputs = _output_paths(loaded, cands, out)
    for path in outputs.values() if written else ():  # said now, not after the whole merge
        check_output_path(path)
    vae = _open_vae(loaded, resolver) if recipe.output.vae else None
    vae_keys = _fitting_vae_keys(loaded, vae, inputs[order[0]]) if vae else {}
    tasks, notes = _plan_keys(loaded, inputs, order, arch, prefix, vae, vae_keys)
    notes[:0] = [*unused_parts_text(recipe), *idle_draws_text(steps)]
    carried, disagreements = agreed_facts((n, inputs[n].header.metadata) for n in order)
    notes.extend(disagreements)
    unused = _unused_selectors(loaded, steps, tasks)
    notes.extend(unused)
    loras = _plan_loras(loaded, steps, inputs[order[0]], arch, prefix, resolver, notes)
    read = [*inputs.values(), *loras.values(), *([vae] if vae else [])]
    if written:
        _refuse_overwriting_inputs(loaded, outputs, read, out)
    there = [p for p in outputs.values() if p.exists() or p.is_symlink()] if written else []
    if there and existing == "refuse":  # every output of a sweep checked now, before any work
        raise UserError(_existing_text(there, "pass --overwrite to replace"))
    if there and existing == "note":
        notes.append(_existing_text(there, "merge replaces"))
    baked = {k for sp in steps for k in (*sp.lora_weights, *sp.lora_biases)}
    for task in tasks:
        if task.key in baked:
            task.merge = True  # even with one source: the step changes it
    return MergePlan(loaded, arch, prefix, inputs, order, steps, cands, outputs, tasks, vae,
                     vae_keys, notes, loras, carried, unused)


def _existing_text(there: list[Path], advice: str) -> str:
    """"X: already exists; ADVICE it (only with --overwrite)", for one output or several."""
    only = "" if advice.startswith("pass") else " only with --overwrite"
    if len(there) == 1:
        return f"{there[0]}: already exists; {advice} it{only}"
    return (f"{there[0]} and {len(there) - 1} other output{'s' if len(there) > 2 else ''} "
            f"already exist; {advice} them{only}")


def _output_error(loaded: LoadedRecipe, out: Path | None, problem: str, subject: str = ""
                  ) -> UserError:
    """A problem of the output path, said at what gave it: `--out` (which names `subject`
    already), or the recipe's line."""
    if out is not None:
        return UserError(f"--out {out}: {problem}")
    return loaded.error(("output", "path"), f"{subject} {problem}".lstrip())


def _refuse_overwriting_inputs(loaded: LoadedRecipe, outputs: dict[str, Path],
                               read: list[PlannedInput | PlannedLora], out: Path | None
                               ) -> None:
    """Every file the merge reads (models, LoRAs, the VAE) is read while the outputs are
    written, and an output replacing one would destroy it, --overwrite or not."""
    for cand, path in outputs.items():
        for planned in read:
            if same_file(planned.path, path):
                raise _output_error(loaded, out, f"the output {path.name} of {cand} would "
                                    f"overwrite the input {planned.name}")


def _plan_loras(loaded: LoadedRecipe, steps: list[StepPlan], first: PlannedInput,
                arch: Architecture, prefix: str, resolver: Resolver, notes: list[str]
                ) -> dict[str, PlannedLora]:
    """Aim the modules of every bake_lora step's LoRAs at the keys of the first input (all
    inputs share its layout); modules that land nowhere stop the plan unless allowed, and are
    listed in `notes` when allowed (count and first names, as `bake` lists them)."""
    from mergekit_sd.lora.bake import LoraUse, match_loras
    from mergekit_sd.lora.targets import TargetIndex

    planned: dict[str, PlannedLora] = {}
    baking = [sp for sp in steps if sp.step.loras]
    if not baking:
        return planned
    shapes = {k: i.shape for k, i in first.header.tensors.items()}
    index = TargetIndex(shapes, arch, prefix)
    for sp in baking:
        at = ("steps", loaded.recipe.steps.index(sp.step), "loras")
        for i, spec in enumerate(sp.step.loras):  # said at its own field, before any file
            problem = _lora_blocks_problem(spec.blocks, arch)
            if problem:
                raise loaded.error((*at, i, "blocks"), problem)
        uses = []
        for spec in sp.step.loras:
            if spec.model not in planned:
                path, known = _locate(loaded, spec.model, resolver)
                ref = loaded.recipe.model_ref(spec.model)
                planned[spec.model] = PlannedLora(spec.model, ref.ref, path, ref.sha256, known)
            uses.append(LoraUse(spec.model, planned[spec.model].path, spec.strength,
                                spec.te_strength, spec.blocks))
        try:
            _, sp.lora_weights, sp.lora_biases, unmatched = match_loras(
                index, arch, uses, first.path.name)
        except UserError as exc:
            raise loaded.error(at, str(exc)) from None
        for use in uses:  # what `plan` shows of each (the headers are read and checked)
            lora = planned[use.ref]
            if not lora.label:
                header = read_header(lora.path)
                lora.label, lora.file_size = identify(header).label, header.file_size
        if not unmatched:
            continue
        from mergekit_sd.lora.targets import plural, unmatched_summary

        count, what = unmatched_summary(unmatched, first.path.name)
        if sp.step.allow_unmatched:
            listed = "; ".join(_first_names(miss) for miss in unmatched)
            notes.append(str(loaded.error(at, f"{plural(count, 'LoRA module')} not baked "
                                              f"({what}), as allow_unmatched: true lets them: "
                                              f"{listed}")))
            continue
        # exit 2, as for any other recipe line that cannot run (bake's exit 1 is for a run the
        # user asked as is): the recipe names its fix
        miss = unmatched[0]
        raise loaded.error(at, f"{plural(count, 'LoRA module')} cannot be baked ({what}), "
                               f"e.g. {(miss.modules + miss.malformed)[0]!r} of {miss.lora}; "
                               "set allow_unmatched: true on the step to bake the rest")
    return planned


_NAMES_NOTED = 8  # module names a plan's note lists per LoRA, as `bake` lists them


def _first_names(miss) -> str:
    """"LORA: name, name (why) … and N more" of one LoRA's modules that land nowhere."""
    entries = miss.modules + miss.malformed
    more = len(entries) - _NAMES_NOTED
    return (f"{miss.lora}: {', '.join(name[:200] for name in entries[:_NAMES_NOTED])}"
            f"{f' … and {more} more' if more > 0 else ''}")


def _lora_blocks_problem(blocks, arch: Architecture) -> str | None:
    """Why a bake_lora LoRA's `blocks` fits no form for `arch`, said as a merge parameter's
    `blocks` is; None when it fits."""
    from mergekit_sd.arch.block_lists import BadBlockList, NotABlockList, listed_blocks
    from mergekit_sd.lora.strengths import BadBlockStrengths, block_strengths
    from mergekit_sd.recipe.schema import LORA_BLOCK_FORMS

    if isinstance(blocks, str) and blocks:  # "" is no per-block strength, as None is
        try:
            listed_blocks(blocks, arch)
        except NotABlockList:
            return f"{blocks!r} is none of the forms blocks takes; {LORA_BLOCK_FORMS}"
        except BadBlockList:
            pass  # a list or preset that does not fit: said below
    try:
        block_strengths(blocks, arch)
    except BadBlockStrengths as exc:
        return exc.problem
    return None


def _output_paths(loaded: LoadedRecipe, cands: list[Candidate], out: Path | None
                  ) -> dict[str, Path]:
    base = out or resolve_path(loaded.recipe.output.path, loaded.path.parent)
    if base.suffix != ".safetensors":
        if base.is_dir():  # `--out out/`: the Path lost the slash, not the folder
            raise _output_error(loaded, out, "is a folder; give a file name ending in "
                                             ".safetensors", str(base))
        raise _output_error(loaded, out, "must end in .safetensors", base.name)
    if len(cands) == 1:
        return {cands[0].name: base}
    # a sweep: one file per candidate, named after it, beside the output path
    return {c.name: base.with_name(f"{base.stem}{c.name[c.name.index('@'):]}.safetensors")
            for c in cands}


def _open_vae(loaded: LoadedRecipe, resolver: Resolver) -> PlannedInput:
    ref = loaded.recipe.output.vae
    loc = ("output", "vae")
    known = None
    if is_path_ref(ref):
        path = resolve_path(ref, loaded.path.parent)
    else:
        try:
            resolved = resolver(ref)
        except LookupError as exc:
            raise loaded.error(loc, str(exc.args[0])) from None
        path, known = resolved.path, resolved.sha256
    try:
        header = read_header(path)
    except BadModelFile as exc:
        raise loaded.error(loc, f"{path.name}: {exc.problem}") from None
    found = identify(header)
    if not any(c.slot == "vae" for c in found.components):
        raise loaded.error(loc, f"{path.name} is {found.label} and holds no VAE")
    return PlannedInput("output.vae", ref, path, header, found, loaded.recipe.output.vae_sha256,
                        known)


def vae_source_keys(vae: PlannedInput, target_prefix: str) -> dict[str, str]:
    """Output key -> key in the VAE file, for a VAE saved alone or inside a checkpoint."""
    comp = next(c for c in vae.found.components if c.slot == "vae")
    return {target_prefix + key[len(comp.prefix):]: key for key in vae.header.tensors
            if key.startswith(comp.prefix) and slot_of(key)[0] in ("vae", "other")}


def _fitting_vae_keys(loaded: LoadedRecipe, vae: PlannedInput, first: PlannedInput
                      ) -> dict[str, str]:
    """Output key -> key in the VAE file, once the VAE is known to replace the inputs' own
    key for key and shape for shape: any other VAE gives a file no program loads."""
    loc = ("output", "vae")
    own = next((c for c in first.found.components if c.slot == "vae"), None)
    if own is None:
        raise loaded.error(loc, f"{first.path.name} is {first.found.label} and has no VAE to "
                                "replace; bake the VAE into a full checkpoint instead")
    vae_keys = vae_source_keys(vae, own.prefix)
    replaced = [k for k in first.header.tensors if slot_of(k) == ("vae", own.prefix)]
    missing = [k for k in replaced if k not in vae_keys]
    reshaped = [k for k in replaced if k in vae_keys and first.header.tensors[k].shape
                != vae.header.tensors[vae_keys[k]].shape]
    if missing or reshaped:
        key = (reshaped or missing)[0]
        why = "has another shape" if reshaped else "is missing"
        theirs = next(c.model for c in vae.found.components if c.slot == "vae")
        raise loaded.error(loc, f"{vae.path.name} holds a {theirs}, which does not fit the "
                                f"{own.model} of "
                                f"{first.path.name}: its {key[len(own.prefix):]!r} {why}; "
                                "give a VAE of the inputs' architecture and key layout")
    return vae_keys


def _plan_keys(loaded: LoadedRecipe, inputs: dict[str, PlannedInput], order: list[str],
               arch: Architecture, prefix: str, vae: PlannedInput | None,
               vae_keys: dict[str, str]) -> tuple[list[KeyTask], list[str]]:
    output = loaded.recipe.output
    keys: dict[str, None] = {}
    for name in order:
        keys.update(dict.fromkeys(inputs[name].header.tensors))
    tasks, only_some, clashes, dropped = [], [], [], 0
    for key in keys:
        slot, _ = slot_in_file(key, prefix)
        if (output.drop_ema or output.inference_only) and slot == "ema":
            dropped += 1
            continue
        if output.inference_only and key in SCHEDULE_KEYS:
            dropped += 1
            continue
        if key in vae_keys:
            continue
        sources = tuple(n for n in order if key in inputs[n].header.tensors)
        info = inputs[sources[0]].header.tensors[key]
        shapes = {inputs[n].header.tensors[key].shape for n in sources}
        merge = info.dtype in FLOAT_DTYPES and len(sources) > 1
        if len(sources) < len(order):
            only_some.append(key)
        if len(shapes) > 1:
            same_rank = len({len(s) for s in shapes}) == 1
            merge = merge and same_rank
            # in input order: the first is the one the output takes
            in_order = ", ".join(f"{inputs[n].header.tensors[key].shape} in {n}" for n in sources)
            clashes.append(f"{key}: shapes {in_order}; " + (
                _overlap_text(key, inputs, sources) if same_rank
                else f"taken from {sources[0]}"))
        block = arch.block_of(key[len(prefix):]) if key.startswith(prefix) else "BASE"
        out = TensorSpec(key, _output_dtype(loaded, info.dtype), info.shape)
        tasks.append(KeyTask(key, slot, block, out, sources, merge))
    for key, source_key in vae_keys.items():
        info = vae.header.tensors[source_key]
        tasks.append(KeyTask(key, "vae", "BASE", TensorSpec(key, _output_dtype(
            loaded, info.dtype), info.shape), (VAE_SOURCE,), False))
    notes = []
    if only_some:
        notes.append(f"{len(only_some)} keys are in only some inputs and are taken from the "
                     f"first that has them (e.g. {only_some[0]})")
    notes.extend(clashes)
    if dropped:
        notes.append(f"{dropped} EMA/training-only keys dropped (output.drop_ema / "
                     "inference_only)")
    if vae_keys:
        notes.append(f"{len(vae_keys)} VAE keys baked from {vae.path.name}")
    return tasks, notes


def _overlap_text(key: str, inputs: dict[str, PlannedInput], sources: tuple[str, ...]) -> str:
    """How a key whose same-rank shapes differ is merged: on the overlap, in the shape of the
    first input that has it; saying what is dropped when another input holds more."""
    first = inputs[sources[0]].header.tensors[key].shape
    larger = [n for n in sources[1:] if any(
        d > f for d, f in zip(inputs[n].header.tensors[key].shape, first, strict=True))]
    if not larger:
        return (f"merged on the overlapping slice, the rest taken from {sources[0]} (as "
                "AUTOMATIC1111 does)")
    return (f"merged on the overlapping slice in the shape of {sources[0]}, which the output "
            f"takes; what {', '.join(larger)} {'holds' if len(larger) == 1 else 'hold'} beyond "
            "it is dropped")


def apply_overrides(loaded: LoadedRecipe, assignments: list[str]) -> None:
    """`--set step.param=value` (value parsed as YAML, so `[0.2,0.4]` makes a sweep). A plain
    value or a sweep replaces only the `default` of a parameter given with blocks, components
    or keys, as a sweep in `default` does; a {mapping} replaces the whole parameter."""
    for assignment in assignments:
        target, sep, raw = assignment.partition("=")
        # a step's name may hold dots (v1.mix); a parameter's never does
        step_name, dot, param = target.rpartition(".")
        if not sep or not dot or not param:
            raise UserError(f"--set {assignment!r}: write it as STEP.PARAM=VALUE")
        step = next((s for s in loaded.recipe.steps if s.name == step_name), None)
        if step is None:
            names = ", ".join(s.name for s in loaded.recipe.steps)
            raise UserError(f"--set {assignment!r}: there is no step {step_name!r} "
                            f"(steps: {names})")
        needed = loaded.recipe.needed_steps
        if step not in needed:  # refused, as a --set that reaches no candidate is by render
            final = loaded.recipe.final_step.name
            raise UserError(f"--set {assignment!r}: step {step_name!r} is not used by the "
                            f"output step {final!r}, so the value would change nothing; set "
                            f"a step it uses ({', '.join(s.name for s in needed)}), or name "
                            f"{step_name} under output.step in the recipe")
        value = _override_value(loaded, assignment, step, param, raw)
        given = step.params.get(param)
        if isinstance(given, ParamSpec) and not isinstance(value, ParamSpec):
            # "same block weights, another base alpha": dropping the blocks would merge them
            # at the new value unsaid
            value = given.model_copy(update={"default": value})
        step.params[param] = value
        # later checks of this value (method, blocks, sweeps) name the --set, not a line
        loaded.overrides[("steps", loaded.recipe.steps.index(step), "params", param)] = assignment


def _override_value(loaded: LoadedRecipe, assignment: str, step: Step, param: str, raw: str):
    """The value of a `--set`, checked as the recipe's own values are."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from mergekit_sd.recipe.loader import describe_validation_error
    from mergekit_sd.recipe.schema import ParamValue
    from mergekit_sd.yaml_lines import DuplicateKey, UniqueKeyLoader

    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader)  # a SafeLoader: no tags that run code
    except DuplicateKey as exc:
        raise UserError(f"--set {assignment!r}: {exc.key.value!r} is given twice") from None
    except (yaml.YAMLError, RecursionError):
        raise UserError(f"--set {assignment!r}: {raw!r} is not a plain YAML value; write a number, "
                        "a [list] to sweep or a {mapping}") from None
    if value is None:
        raise UserError(f"--set {assignment!r}: give a value after '='")
    try:
        return TypeAdapter(ParamValue).validate_python(value)
    except ValidationError as exc:
        at = ("steps", loaded.recipe.steps.index(step), "params", param)
        loc, problem = describe_validation_error(exc, at)
        field = ".".join(str(part) for part in loc[len(at):])
        raise UserError(f"--set {assignment!r}: {field + ': ' if field else ''}{problem}"
                        ) from None
