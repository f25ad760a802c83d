"""Merge several LoRAs into one kohya-format LoRA: concatenated ranks, or SVD to a chosen rank.

Concatenation is exact: Σ sᵢ·upᵢ@downᵢ = [s₁·up₁ … sₙ·upₙ] @ [down₁; …; downₙ], so the merged
file bakes to the same weights as baking each LoRA at its strength sᵢ; ranks add up, except
that modules with the same down factor (a LoRA given twice) share it: their ups are summed.
With `rank`, each weight's summed delta is factored again by SVD to that rank (smaller file,
approximate); this also merges LoHa, LoKr and Tucker modules, which have no up/down pair to
concatenate.

A merged module whose factors multiply to exactly zero (strengths that cancel) changes nothing
and is left out, with a note; "exactly" is read off the factors written, never a tolerance,
so a small real delta is kept.

Modules are matched by the checkpoint weight they change (`TargetIndex`), so LoRAs of different
formats (kohya, PEFT, diffusers FLUX with separate q/k/v) merge with each other. The weights'
full shapes come from a base checkpoint when given, else from the architecture's real layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mergekit_sd.arch.architectures import ARCHITECTURES, Architecture
from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.arch.layouts import load_layout
from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.dtypes import LORA_DTYPES, parse_dtype
from mergekit_sd.io.hashing import file_sha256
from mergekit_sd.io.header import read_header
from mergekit_sd.io.saturate import Clamped
from mergekit_sd.io.writer import refuse_replacing_inputs
from mergekit_sd.lora.bake import damaged, damaged_tensor, malformed, not_baked_why, shape_problem
from mergekit_sd.lora.compat import is_guess, lora_architecture, lora_fits, not_what_is_wanted
from mergekit_sd.lora.deltas import module_delta
from mergekit_sd.lora.extract import truncated_svd
from mergekit_sd.lora.kohya_file import factors_for, write_kohya_lora
from mergekit_sd.lora.modules import LoraModule, load_lora
from mergekit_sd.lora.strengths import strength_problem
from mergekit_sd.lora.targets import Target, TargetIndex, Unmatched, plural

_SHOW_LEFT_OUT = 3  # names of modules that change nothing, in the note
_REFERENCE_LAYOUTS = {"sd": "sd1-ldm", "sdxl": "sdxl-sgm", "flux": "flux1-dev-bfl",
                      "sd3": "sd3-medium-comfyui"}


@dataclass
class MergeReport:
    output: Path
    modules: int = 0
    rank: int = 0
    unmatched: list[Unmatched] = field(default_factory=list)  # per LoRA, those with any
    clamped: Clamped = field(default_factory=Clamped)  # factors beyond the output dtype
    notes: list[str] = field(default_factory=list)  # what the command says besides

    def miss(self, lora: str) -> Unmatched:
        """The listing of the LoRA named `lora` (made on first need)."""
        found = next((u for u in self.unmatched if u.lora == lora), None)
        if found is None:
            found = Unmatched(lora, [])
            self.unmatched.append(found)
        return found


def _lora_ident(path: Path) -> Identification:
    header = read_header(path)
    found = identify(header)
    if found.kind != "lora":
        raise BadModelFile(path, not_what_is_wanted(found, header, "a LoRA"))
    if lora_architecture(found) is None:
        raise UserError(f"{path}: the LoRA's base model cannot be told from its keys; merge "
                        "LoRAs whose base `mergekit-sd inspect` can name")
    return found


def _common_architecture(loras: list[tuple[Path, float]], found: list[Identification]
                         ) -> Architecture:
    """The architecture all the LoRAs are for (that of the first one not merely assumed SD1);
    LoRAs for another are refused."""
    sure = [f for f in found if not is_guess(f)] or found
    arch = lora_architecture(sure[0])
    if not all(lora_fits(f, arch) for f in found):
        labels = ", ".join(f"{p.name} ({lora_architecture(f).label})"
                           for (p, _), f in zip(loras, found, strict=True))
        raise UserError(f"these LoRAs are for different architectures: {labels}")
    return arch


def _base_architecture(base: Path, header, found: list[Identification], arch: Architecture
                       ) -> Architecture:
    """The architecture of --base, which must be a checkpoint the LoRAs are for."""
    ident = identify(header)
    if ident.kind not in ("checkpoint", "diffusion_model") or \
            ident.architecture not in ARCHITECTURES:
        raise BadModelFile(base, f"is {ident.label}, not a checkpoint; give --base a checkpoint "
                                 f"of the LoRAs' architecture ({arch.label})")
    base_arch = ARCHITECTURES[ident.architecture]
    if not all(lora_fits(f, base_arch) for f in found):
        raise UserError(f"--base {base.name} is {base_arch.label} and the LoRAs are for "
                        f"{arch.label}; give a checkpoint of {arch.label}")
    return base_arch


def _index(arch: Architecture, base: Path | None, header=None) -> TargetIndex:
    if base is not None:
        shapes = {k: i.shape for k, i in header.tensors.items()}
    elif arch.family in _REFERENCE_LAYOUTS and arch.id != "sd2":
        layout = load_layout(_REFERENCE_LAYOUTS[arch.family])
        shapes = {e.name: e.shape for e in layout}
    else:
        raise UserError(f"no shipped layout for {arch.label}; pass --base CHECKPOINT")
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.")
                                             for k in shapes) else ""
    return TargetIndex(shapes, arch, prefix)


def _weight_part(module: LoraModule) -> LoraModule | None:
    """`module` without a full diff's bias change (`diff_b`), which kohya's format has no
    place for; None when that is all it holds."""
    if "diff_b" not in module.tensors:
        return module
    rest = {role: t for role, t in module.tensors.items() if role != "diff_b"}
    return replace(module, tensors=rest) if rest else None


def _mergeable(module: LoraModule, target: Target, exact_shapes: bool
               ) -> tuple[LoraModule | None, list[str]]:
    """(what of `module` goes into the merged LoRA, or None; what does not, as the listing
    names it, with the reason): tensors that do not fit the weight or a malformed module are
    left out whole; a full diff's bias change (kohya's format has no place for it) alone.
    Shapes are compared only where `exact_shapes`."""
    left_out = []
    if "diff_b" in module.tensors:
        left_out.append(f"{module.name}.diff_b (a bias change: kohya's LoRA format carries none)")
    weight_part = _weight_part(module)
    check = shape_problem if exact_shapes else lambda m, _shape: malformed(m)
    problem = check(weight_part, target.shape) if weight_part else None
    if problem:
        left_out.append(f"{module.name} ({problem})")
        weight_part = None
    return weight_part, left_out


def _pair(module: LoraModule, strength: float):
    """(up, down) as 2-D fp32 factors with the module's scale and strength folded into up."""
    t = module.tensors
    scale = module.alpha / t["down"].shape[0] if module.alpha else 1.0
    return t["up"].float().flatten(1) * (strength * scale), t["down"].float().flatten(1)


def changes_nothing(up, down) -> bool:
    """Whether 2-D factors multiply to exactly zero: every rank has an all-zero up column or
    an all-zero down row (read off the factors, so no small delta is taken for none)."""
    return not bool(((up != 0).any(dim=0) & (down != 0).any(dim=1)).any())


def merge_loras(loras: list[tuple[Path, float]], output: Path, rank: int | None = None,
                base: Path | None = None, dtype: str = "fp16", clamp_quantile: float = 1.0,
                allow_unmatched: bool = False) -> MergeReport:
    import torch

    if not loras or (len(loras) < 2 and rank is None):  # one LoRA concatenated is itself
        raise UserError("give at least two LoRAs to merge, or one with --rank R to resize it")
    if rank is not None and rank < 1:  # 0 fails in the SVD, -3 drops the last 3 directions
        raise UserError(f"--rank {rank}: give at least 1")
    if not 0 < clamp_quantile <= 1:  # also false for nan
        raise UserError(f"--clamp-quantile {clamp_quantile}: give a number in (0, 1]")
    if rank is None and clamp_quantile != 1:
        raise UserError(f"--clamp-quantile {clamp_quantile:g} applies only to merges by SVD; "
                        "add --rank R, or leave it out to concatenate the ranks exactly")
    for path, strength in loras:
        problem = strength_problem(strength)
        if problem:
            raise UserError(f"{path}: strength {problem}; give a number such as 0.5")
    if not any(strength for _, strength in loras):
        raise UserError("every LoRA has strength 0, so the merged LoRA would change nothing; "
                        "give a strength other than 0")
    dtype = parse_dtype(dtype, LORA_DTYPES, "lora merge")
    refuse_replacing_inputs(Path(output), [p for p, _ in loras] + ([base] if base else []))
    found = [_lora_ident(p) for p, _ in loras]
    arch = _common_architecture(loras, found)
    base_header = read_header(base) if base is not None else None
    if base is not None:
        arch = _base_architecture(base, base_header, found, arch)
    index = _index(arch, base, base_header)
    report = MergeReport(output)
    # SVD builds each delta in its weight's shape, and a base is the truth of the shapes;
    # concatenating factors needs neither (the shipped layout may be another model size's)
    exact_shapes = rank is not None or base is not None
    by_key: dict[str, list[tuple[LoraModule, float, Target, str]]] = {}
    names = [path.name for path, _ in loras]
    for i, (path, strength) in enumerate(loras):
        # a file given twice is listed per argument, not as one file with twice its modules
        label = path.name if names.count(path.name) == 1 else f"{path.name} (argument {i + 1})"
        lora = load_lora(path)
        for module in lora.modules.values():  # NaN would spread over every weight it meets
            bad = damaged_tensor(module)
            if bad:
                raise damaged(path, bad)
        miss = report.miss(label)
        # tensors carried by no module: the merged LoRA would lose them unseen
        miss.malformed += [f"{key} ({not_baked_why(key)})" for key in lora.ignored]
        for module in lora.modules.values():
            target = index.find(module.name)
            if target is None:
                miss.modules.append(module.name)
                continue
            module, left_out = _mergeable(module, target, exact_shapes)
            miss.malformed += left_out
            if module is None:
                continue
            if "dora" in module.tensors:
                raise UserError(f"{path.name}: DoRA modules need the base weights to merge; bake "
                                "it into a checkpoint with `mergekit-sd bake` instead")
            if strength:  # at strength 0 it adds nothing, and would add its rank (said below)
                by_key.setdefault(target.key, []).append((module, strength, target, label))
        if not strength:
            report.notes.append(f"{label}: strength 0, so it is left out of the merged LoRA")
    groups = []
    for key, entries in _groups(by_key, index):
        whole = _whole(key, entries, index)
        if whole and not exact_shapes:  # the rows of the parts are placed by the layout's
            entries = _fitting(entries, report)
        if entries:
            groups.append((key, entries, _whole(key, entries, index)))
    report.unmatched = [u for u in report.unmatched if u.count]
    if report.unmatched and not allow_unmatched:
        return report
    modules, nothing = {}, []
    for key, entries, whole in groups:
        name = index.kohya.get((key, None) if whole else (key, entries[0][2].rows))
        if name is None:
            raise UserError(f"{key}: its modules cover different rows and kohya's format has no "
                            "name for the whole weight; merge these LoRAs with --base")
        shape = index.shapes[key] if whole else entries[0][2].shape
        kernel = tuple(shape[2:])
        if rank is None:
            up, down = _concatenate(entries, shape, whole, key)
        else:
            delta = torch.zeros(shape)
            for module, strength, target, _ in entries:
                view = delta[target.rows[0]:target.rows[1]] if whole and target.rows else delta
                view += strength * module_delta(module, tuple(view.shape))
            # a delta summed to exactly zero has nothing to factor (its SVD factors are zero)
            up, down = truncated_svd(delta, rank, clamp_quantile) if delta.any() else (None, None)
        if up is None or changes_nothing(up, down):
            nothing.append(name)
        else:
            modules[name] = factors_for(up, down, kernel)
    if nothing:
        _say_left_out(sorted(nothing), bool(modules), report)
    # "strength", the word of bake and recipes; nothing reads the entries' number, and the
    # catalog's lineage reads only name and sha256
    provenance = {"mergekit_sd.merged_loras": [
        {"name": p.name, "sha256": file_sha256(p), "strength": s} for p, s in loras]}
    write_kohya_lora(output, modules, arch, dtype, provenance, report.clamped)
    report.modules = len(modules)
    report.rank = max((down.shape[0] for _, down in modules.values()), default=0)
    return report


def _say_left_out(names: list[str], some_kept: bool, report: MergeReport) -> None:
    """A note naming the first few modules that change nothing (they are left out), or, when
    that is all of them, the refusal: an empty LoRA is nothing to write."""
    if not some_kept:
        raise UserError("every module of the merged LoRA changes nothing (its factors multiply "
                        "to exactly zero, as when the strengths cancel), so there is nothing to "
                        "write; check the LoRAs and their strengths")
    shown = ", ".join(names[:_SHOW_LEFT_OUT]) + (" …" if len(names) > _SHOW_LEFT_OUT else "")
    report.notes.append(f"{plural(len(names), 'module')} changed nothing once merged (the "
                        f"factors multiply to exactly zero, as strengths that cancel do) and "
                        f"{'were' if len(names) != 1 else 'was'} left out: {shown}")


def _whole(key: str, entries: list, index: TargetIndex) -> bool:
    """Whether the merged module of these modules is one of the whole weight: they cover
    different rows of it, or rows that kohya's format has no name for (a FLUX q alone)."""
    rows = {target.rows for _, _, target, _ in entries}
    return len(rows) > 1 or (None not in rows and (key, next(iter(rows))) not in index.kohya)


def _fitting(entries: list, report: MergeReport) -> list:
    """The modules of a whole-weight group whose shapes fit the weight (or their rows of it) in
    the reference layout, where the parts are padded to the whole weight's rows; the others
    are listed (a LoRA of another model size: pass --base)."""
    kept = []
    for entry in entries:
        module, _, target, lora = entry
        problem = shape_problem(module, target.shape)
        if problem:
            report.miss(lora).malformed.append(f"{module.name} ({problem} in the shipped "
                                               "layout; pass --base)")
        else:
            kept.append(entry)
    return kept


def _groups(by_key: dict, index: TargetIndex):
    """(key, modules) to merge into one output module: the modules of one weight, split by
    rows where they cover separate row ranges that each have a name (OpenCLIP's q, k and v
    within in_proj_weight), else all together on the whole weight."""
    for key, entries in by_key.items():
        by_rows: dict = {}
        for entry in entries:
            by_rows.setdefault(entry[2].rows, []).append(entry)
        ranges = sorted(r for r in by_rows if r is not None)
        separate = None not in by_rows and all(
            a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)) and all(
            (key, r) in index.kohya for r in ranges)
        if len(by_rows) > 1 and separate:
            yield from ((key, group) for group in by_rows.values())
        else:
            yield key, entries


def _concatenate(entries, shape, whole: bool, key: str):
    import torch

    ups, downs = [], []
    for module, strength, target, _ in entries:
        if module.algo != "lora" or "mid" in module.tensors:
            kind = "Tucker" if "mid" in module.tensors else module.algo
            raise UserError(f"{module.name}: {kind} modules have no up/down pair to concatenate; "
                            "pass --rank R to merge by SVD")
        up, down = _pair(module, strength)
        if whole and target.rows is not None:
            padded = torch.zeros(shape[0], up.shape[1])
            padded[target.rows[0]:target.rows[1]] = up
            up = padded
        # the same down factor again (a LoRA given twice, or with its negation) takes one
        # place: u·d + u'·d = (u + u')·d, so strengths that cancel leave an all-zero up
        same = next((i for i, d in enumerate(downs)
                     if d.shape == down.shape and torch.equal(d, down)), None)
        if same is not None:
            ups[same] = ups[same] + up
            continue
        ups.append(up)
        downs.append(down)
    if len({d.shape[1] for d in downs}) > 1:
        raise UserError(f"{key}: the LoRAs' modules for this weight have different input widths")
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)
