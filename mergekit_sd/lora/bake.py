"""Bake LoRAs into a checkpoint in one streaming pass, with provenance in the output.

`plan_bake` reads headers and the (small) LoRAs, and decides for every LoRA module which
checkpoint weight it changes; modules that land nowhere are reported, never skipped silently.
It runs in two steps: `prepare_bake`, from the files' headers alone (no torch), finds the
weights the LoRAs name, so that the output can begin (`bake_run.BakeStream`) while
`load_loras` loads them.
`apply_loras` adds every module aimed at a weight (several LoRAs in the same pass) to it in
fp32, and `bake_metadata` says what was baked in. `bake_run.run_bake` streams the checkpoint
once through them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd import __version__
from mergekit_sd.arch.architectures import ARCHITECTURES, Architecture
from mergekit_sd.arch.diffusion import SD_CONV_IN_KEYS, sd_conv_in_variant
from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.convert import META_BAKED_LORAS, META_RECIPE_OUTPUT
from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.dtypes import (
    CHECKPOINT_DTYPES,
    USER_DTYPES,
    parse_dtype,
    safetensors_dtype,
)
from mergekit_sd.io.hash_cache import known_sha256 as remembered_sha256
from mergekit_sd.io.hashing import BackgroundSha256, file_sha256, legacy_model_hash
from mergekit_sd.io.header import SafetensorsHeader, read_header
from mergekit_sd.io.nonfinite import all_finite as _finite
from mergekit_sd.io.saturate import Clamped
from mergekit_sd.io.writer import refuse_replacing_inputs
from mergekit_sd.lora.compat import lora_architecture, lora_fits, not_what_is_wanted
from mergekit_sd.lora.deltas import DeltaShapeError, apply_dora, module_delta
from mergekit_sd.lora.modules import LoraFile, LoraModule, group_modules, load_lora
from mergekit_sd.lora.strengths import BlockSpec, beyond_float32, block_strengths, strength_problem
from mergekit_sd.lora.targets import DIFFUSION, Target, TargetIndex, Unmatched
from mergekit_sd.merge.a1111 import a1111_models_entry, a1111_recipe
from mergekit_sd.recipe.refs import recorded_ref

# the names --dtype takes (as convert and a recipe take them) -> safetensors dtype
OUTPUT_DTYPES = {name: USER_DTYPES.get(name) for name in CHECKPOINT_DTYPES}
UNKNOWN_SHA256 = "~" * 64  # in the metadata written first, until the hash is known
_FLOATS = ("F64", "F32", "F16", "BF16")


@dataclass
class LoraUse:
    """One LoRA to bake and how strongly."""

    ref: str  # as the user named it
    path: Path
    strength: float = 1.0
    te_strength: float | None = None  # None: the same as `strength`
    blocks: BlockSpec = None
    sha256: str | None = None  # when already known (the catalog's)


@dataclass
class Application:
    module: LoraModule
    target: Target
    strength: float  # the LoRA's strength for this target's slot and block
    lora: int  # index into the plan's loras
    path: Path | None = None  # the LoRA's file, named when one of its tensors is damaged


@dataclass
class BakePlan:
    base: Path
    header: SafetensorsHeader
    arch: Architecture
    uses: list[LoraUse]
    files: list[LoraFile]
    output: Path
    dtype: str
    weights: dict[str, list[Application]] = field(default_factory=dict)  # checkpoint key ->
    biases: dict[str, list[Application]] = field(default_factory=dict)
    unmatched: list[Unmatched] = field(default_factory=list)
    # values beyond the output dtype's range, clamped to it (the CLI prints its notes)
    clamped: Clamped = field(default_factory=Clamped)
    known_sha256: str | None = None
    lora_sha256s: list[str] = field(default_factory=list)
    base_hash: BackgroundSha256 | None = None  # hashing the base meanwhile, when not known
    index: TargetIndex | None = None
    touched: set[str] = field(default_factory=set)  # keys some LoRA module names
    lora_headers: list[SafetensorsHeader] = field(default_factory=list)  # read while planning
    base_ref: str = ""  # the base as the user named it (a path or a catalog reference)
    # bake past modules that land nowhere (--allow-unmatched): recorded in the recipe stored,
    # so that `recipe extract` gives one that bakes the same tensors again
    allow_unmatched: bool = False

    def stop(self) -> None:
        """Stop the work it runs in the background (the base's hash): the bake is not going
        ahead."""
        if self.base_hash is not None:
            self.base_hash.stop()

    def done_with(self, key: str) -> None:
        """The weight at `key` is baked: the memory of the LoRA modules applied to it goes
        back (the mapped LoRAs would otherwise grow to their full size in the process)."""
        for app in (*self.weights.get(key, ()), *self.biases.get(key, ())):
            mapped = self.files[app.lora].mapped
            if mapped is not None:
                mapped.release(app.module.keys)

    @property
    def unmatched_count(self) -> int:
        return sum(u.count for u in self.unmatched)

    def changed_keys(self) -> int:
        """The tensors the bake changes: those some module reaches at a strength other than 0
        (a LoRA at strength 0, or a block at 0, names its tensors and leaves them as they
        are)."""
        applied = (*self.weights.values(), *self.biases.values())
        return sum(any(app.strength for app in apps) for apps in applied)


def _diffusion_prefix(header: SafetensorsHeader) -> str:
    prefix = "model.diffusion_model."
    return prefix if any(k.startswith(prefix) for k in header.tensors) else ""


def _check_base(path: Path, found: Identification) -> Architecture:
    if found.kind not in ("checkpoint", "diffusion_model") or found.architecture not in \
            ARCHITECTURES:
        raise BadModelFile(path, f"is {found.label}, not a checkpoint or diffusion model to bake "
                                 "LoRAs into")
    return ARCHITECTURES[found.architecture]


def _check_strengths(use: LoraUse) -> None:
    """NaN or infinity would fill the checkpoint with NaN (and the metadata with invalid
    JSON); a number beyond float32's range (1e300) cannot be handed to the arithmetic."""
    for what, value in (("strength", use.strength), ("te_strength", use.te_strength)):
        problem = None if value is None else strength_problem(value)
        if problem:
            raise UserError(f"{use.ref}: {what} {problem}; give a number such as 0.8")


def _check_lora(use: LoraUse, found: Identification, arch: Architecture,
                header: SafetensorsHeader) -> None:
    if found.kind != "lora":
        raise BadModelFile(use.path, not_what_is_wanted(found, header, "a LoRA"))
    if not lora_fits(found, arch):
        raise UserError(f"{use.path}: this LoRA is for {lora_architecture(found).label} and the "
                        f"base is {arch.label}; pick a LoRA made for {arch.label}")


def plan_bake(base: str | Path, uses: list[LoraUse], output: str | Path, dtype: str = "keep",
              known_sha256: str | None = None, base_ref: str | None = None,
              allow_unmatched: bool = False) -> BakePlan:
    """Check the inputs and aim every LoRA module at its weight (`prepare_bake`, then
    `load_loras`)."""
    plan = prepare_bake(base, uses, output, dtype, known_sha256, base_ref, allow_unmatched)
    try:
        load_loras(plan)
    except BaseException:
        plan.stop()
        raise
    return plan


def prepare_bake(base: str | Path, uses: list[LoraUse], output: str | Path,
                 dtype: str = "keep", known_sha256: str | None = None,
                 base_ref: str | None = None, allow_unmatched: bool = False) -> BakePlan:
    """The plan as far as the files' headers tell it: the base and the LoRAs checked, and the
    weights the LoRAs' modules name (`touched`). Unless the base's SHA256 is known (given, or
    remembered), it starts being hashed now, on another core (`base_hash`). `base_ref` is the
    base as the user named it (default: the path `base`), for the provenance, as is
    `allow_unmatched` (the caller refuses a bake with unmatched modules without it)."""
    base = Path(base)
    dtype = parse_dtype(dtype, CHECKPOINT_DTYPES, "bake")
    for use in uses:
        _check_strengths(use)
    refuse_replacing_inputs(Path(output), [base, *(use.path for use in uses)])
    header = read_header(base)
    arch = _check_base(base, identify(header))
    lora_headers = [read_header(use.path) for use in uses]
    for use, lora_header in zip(uses, lora_headers, strict=True):  # before the key maps
        _check_lora(use, identify(lora_header), arch, lora_header)
    plan = BakePlan(base, header, arch, uses, [], Path(output), dtype, known_sha256=known_sha256,
                    lora_headers=lora_headers, base_ref=str(base) if base_ref is None else base_ref,
                    allow_unmatched=allow_unmatched)
    if not known_sha256 and not remembered_sha256(base):
        plan.base_hash = BackgroundSha256(base)
    try:
        shapes = {k: info.shape for k, info in header.tensors.items()}
        plan.index = TargetIndex(shapes, arch, _diffusion_prefix(header))
        for lora_header in lora_headers:
            for name, roles in group_modules(lora_header)[0].items():
                target = plan.index.find(name)
                if target is not None:
                    plan.touched.add(target.key)
                    if "diff_b" in roles and target.bias:
                        plan.touched.add(target.bias)
    except BaseException:
        plan.stop()
        raise
    return plan


def load_loras(plan: BakePlan) -> None:
    """Load the LoRAs and aim every module at its weight; their SHA256s for the provenance."""
    plan.files, plan.weights, plan.biases, plan.unmatched = match_loras(
        plan.index, plan.arch, plan.uses, plan.base.name, plan.lora_headers)
    plan.lora_sha256s = [u.sha256.lower() if u.sha256 else file_sha256(u.path)
                         for u in plan.uses]


def match_loras(index: TargetIndex, arch: Architecture, uses: list[LoraUse], base_name: str,
                headers: list[SafetensorsHeader] | None = None):
    """Load each LoRA and aim every module at its weight: (files, weight applications by key,
    bias applications by key, unmatched modules). A LoRA none of whose modules fits is
    refused as one for another architecture. `headers`: the LoRAs' own, when already read and
    checked (`prepare_bake`)."""
    files, weights, biases, unmatched = [], {}, {}, []
    for i, use in enumerate(uses):
        _check_strengths(use)  # a recipe's bake_lora comes here without prepare_bake
        if headers:
            header = headers[i]
        else:
            header = read_header(use.path)
            _check_lora(use, identify(header), arch, header)
        lora = load_lora(use.path, header)
        files.append(lora)
        blocks = block_strengths(use.blocks, arch, f"{use.ref}: blocks")
        te = use.strength if use.te_strength is None else use.te_strength
        missing, bad = [], []
        for module in lora.modules.values():
            target = index.find(module.name)
            if target is None:
                missing.append(module.name)
                continue
            problem = shape_problem(module, target.shape)
            if problem:  # malformed, or for another model of this architecture (another width)
                bad.append(f"{module.name} ({problem})")
                continue
            if module.alpha is not None and not math.isfinite(module.alpha):
                raise damaged(use.path, module.key_of("alpha"))
            strength = (use.strength if target.slot == DIFFUSION else te) * blocks[target.block]
            if beyond_float32(strength * _plain_scale(module)):
                raise UserError(f"{use.ref}: its strength on {module.name} "
                                f"({strength:g} × alpha/rank {_plain_scale(module):g}) is beyond "
                                "float32's range, in which LoRAs are applied; lower the strength")
            app = Application(module, target, strength, i, use.path)
            if module.tensors.keys() - {"diff_b"}:
                weights.setdefault(target.key, []).append(app)
            if "diff_b" in module.tensors and target.bias:
                biases.setdefault(target.bias, []).append(app)
        if missing and len(missing) == len(lora.modules):
            raise UserError(f"{use.path}: none of its {len(missing)} modules names a weight of "
                            f"{base_name} ({arch.label}), e.g. {missing[0]!r}; is it a LoRA for "
                            "another architecture?")
        bad += [f"{key} ({not_baked_why(key)})" for key in lora.ignored]
        if missing or bad:
            unmatched.append(Unmatched(use.ref, missing, bad))
    return files, weights, biases, unmatched


def damaged(path: Path, key: str) -> UserError:
    """The error for a LoRA tensor holding NaN or infinity: whatever it touched would be NaN
    (a black image), so the LoRA is refused, naming the tensor."""
    return UserError(f"{path}: its tensor {key} holds NaN or infinite values, so the file is "
                     "damaged; nothing written (download or train it again)")


def not_baked_why(key: str) -> str:
    """Why a LoRA tensor that belongs to no module this bake reads changes nothing: it is
    listed with the unmatched modules rather than dropped unseen."""
    if key.startswith("bundle_emb"):
        return "a bundled textual-inversion embedding, not a weight; load it as an embedding"
    if key.endswith((".w_norm", ".b_norm")):
        return "a LyCORIS norm-layer change, which mergekit-sd does not apply"
    return "no LoRA module tensor mergekit-sd reads"


def _plain(module: LoraModule) -> bool:
    t = module.tensors
    return module.algo == "lora" and "mid" not in t and "dora" not in t


def exact_in(apps: list[Application], dtype, rows: int) -> bool:
    """Whether `apply_loras` may work on a weight of `rows` rows in `dtype` itself (fp16,
    bf16) rather than on an fp32 copy with the same result: plain LoRA modules whose factors
    are stored in that dtype, each on rows of its own (one module on the whole weight, or the
    separate q, k and v of a fused qkv). Each element's product is then accumulated in fp32 by
    the matrix kernel and rounded once, as the fp32 route rounds once when casting back; where
    two modules shared an element, it would be rounded again for the second."""
    spans = sorted(app.target.rows or (0, rows) for app in apps)
    if any(end > start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)):
        return False  # two modules on one row
    for app in apps:
        t = app.module.tensors
        if not _plain(app.module) or t["up"].dtype != dtype or t["down"].dtype != dtype:
            return False
    return True


def row_separable(apps: list[Application]) -> bool:
    """Whether `apply_plain_rows` can bake these modules into a weight a block of rows at a
    time (on several cores at once) with the result `apply_loras` gives: every one a plain
    LoRA, whose delta's rows each come from the same row of `up`."""
    return all(_plain(app.module) for app in apps)


def apply_plain_rows(tensor, apps: list[Application], first: int, end: int) -> None:
    """Rows [first, end) of the weight with every (plain) module's delta added, each module
    where its target's rows meet them, in the order `apply_loras` adds them."""
    for app in apps:
        start, stop = app.target.rows or (0, tensor.shape[0])  # the module's rows
        lo, hi = max(start, first), min(stop, end)
        if app.strength and lo < hi:
            _add_plain(tensor[lo:hi], app, lo - start)


def _plain_scale(module: LoraModule) -> float:
    """alpha / rank of a plain LoRA module (1 for the other kinds, whose scale `module_delta`
    applies to the delta itself)."""
    down = module.tensors.get("down")
    if not _plain(module) or not module.alpha or down is None or down.ndim < 1 \
            or not down.shape[0]:
        return 1.0
    return module.alpha / down.shape[0]


def _add_plain(view, app: Application, up_row: int) -> None:
    """The common case, fused: view += s·scale·up@down (from `up`'s row `up_row` on) without
    a delta temporary."""
    t = app.module.tensors
    view.reshape(view.shape[0], -1).addmm_(
        t["up"].flatten(1)[up_row:up_row + view.shape[0]].to(view.dtype),
        t["down"].to(view.dtype).flatten(1), alpha=app.strength * _plain_scale(app.module))


def apply_loras(tensor, apps: list[Application], bias: bool):
    """The weight with every module's delta added, at each one's strength: in fp32, or in the
    weight's own dtype when `exact_in` says that gives the same result."""
    for app in apps:
        if app.strength == 0:
            continue
        rows = app.target.rows
        view = tensor if rows is None else tensor[rows[0]:rows[1]]
        if bias:
            view += app.strength * app.module.tensors["diff_b"].float().reshape(view.shape)
            continue
        t = app.module.tensors
        if _plain(app.module):
            _add_plain(view, app, 0)
            continue
        delta = module_delta(app.module, tuple(view.shape))
        if delta is None:
            continue
        if "dora" in t:
            view.copy_(apply_dora(view, delta, app.module.tensors["dora"], app.strength))
        else:
            view += app.strength * delta
    return tensor


# A delta below this everywhere cannot carry a finite weight of any float dtype past its
# largest finite value: fp16's, 65504, lies 16 below where rounding turns to infinity (65520),
# and the wider dtypes leave far more room there.
SAFE_DELTA = 8.0


def delta_bound(apps: list[Application]) -> float:
    """An upper bound on |the sum of the modules' deltas| over every element of the weight,
    for plain LoRA modules (infinity for the other kinds, NaN when a factor or alpha holds
    NaN or infinity). Below `SAFE_DELTA`, a weight baked from a finite one is finite, so
    `finite_or_clamped` need not read it (about a tenth of a bake's time,
    bench/bake_parts.py). The cheap bound comes first (`_largest_elements`); only where it
    does not settle the question, the tighter one (`_largest_norms`)."""
    loose = _bound(apps, _largest_elements)
    return loose if loose < SAFE_DELTA else _bound(apps, _largest_norms)


def _bound(apps: list[Application], product_bound) -> float:
    total = 0.0
    for app in apps:
        if not app.strength:
            continue
        if not _plain(app.module):
            return math.inf
        up, down = (app.module.tensors[r].flatten(1) for r in ("up", "down"))
        if not up.numel() or not down.numel():
            return math.inf
        total += abs(app.strength * _plain_scale(app.module)) * product_bound(up, down)
    return total


def _largest_norms(up, down) -> float:
    """By Cauchy-Schwarz, no element of up@down exceeds up's largest row norm times down's
    largest column norm."""
    import torch

    return float(torch.linalg.vector_norm(up, dim=1, dtype=torch.float32).max()) * \
        float(torch.linalg.vector_norm(down, dim=0, dtype=torch.float32).max())


def _largest_elements(up, down) -> float:
    """The rank times up's and down's largest magnitudes (each norm of `_largest_norms` is at
    most the square root of the rank times its largest element): often ten times looser, but
    read in the factors' own dtype, without the fp32 copies the norms take, at about three
    times their speed (a quarter of a core-second for an SDXL LoRA of rank 64, spent while
    the cores are busiest)."""
    import torch

    def largest(factor) -> float:
        low, high = (float(v) for v in torch.aminmax(factor))
        return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)

    return up.shape[1] * largest(up) * largest(down)


def finite_or_clamped(result, apps: list[Application], key: str,
                      clamped: Clamped | None = None, bound: float = math.inf) -> None:
    """Check a weight just baked (in place): one read (`_finite`), in the common case, and
    none where `bound` (`delta_bound`) shows the LoRAs could not make a finite weight
    anything else (the base's own NaN or infinity then stay, as in every weight no LoRA
    touches). NaN or
    infinity in it would blacken every image, and never goes out silently: a LoRA tensor
    holding them is refused, naming it; values beyond the range of a weight baked in fp16 or
    bf16 itself (the matrix kernel accumulates in fp32 and rounds once) are clamped to it,
    as a narrowing cast of the fp32 result would clamp them (`saturating_cast`), and counted
    in `clamped`; anything else, a result beyond float32's own range above all, is refused."""
    import torch

    if not result.numel() or not any(app.strength for app in apps):  # left as it was
        return
    if bound < SAFE_DELTA or _finite(result):
        return
    for app in apps:
        damaged_key = damaged_tensor(app.module) if app.strength else None
        if damaged_key:
            raise damaged(app.path or Path(f"LoRA #{app.lora + 1}"), damaged_key)
    if bool(torch.isnan(result).any()):
        raise UserError(f"{key}: the baked weight holds NaN although the LoRAs' tensors are "
                        "finite: the base's own values there are NaN or infinite; nothing "
                        "written")
    if result.dtype in (torch.float16, torch.bfloat16):
        limit = torch.finfo(result.dtype).max
        count = int(torch.isinf(result).sum())
        result.clamp_(-limit, limit)
        if clamped is not None:
            clamped.add(safetensors_dtype(result.dtype), key, count)
        return
    raise UserError(f"{key}: the baked weight goes beyond float32's range (±3.4e38), where "
                    "the LoRAs are applied: lower their strengths (or the base's own values "
                    "there are infinite); nothing written")


def narrow_into(tensor, work, key: str, clamped: Clamped | None = None) -> None:
    """Copy the fp32 `work` into `tensor` of a narrower float dtype, clamping what lies beyond
    its range (counted in `clamped`) instead of making it infinite; without allocating, in
    the common case (`work` is a scratch buffer, clamped in place when it must be)."""
    import torch

    tensor.copy_(work)
    if tensor.dtype == work.dtype or not tensor.numel() or \
            torch.finfo(tensor.dtype).max >= torch.finfo(work.dtype).max:
        return
    if _finite(tensor):
        return
    limit = torch.finfo(tensor.dtype).max
    count = int((work.abs() > limit).sum())
    tensor.copy_(work.clamp_(-limit, limit))
    if clamped is not None:
        clamped.add(safetensors_dtype(tensor.dtype), key, count)


def damaged_tensor(module: LoraModule) -> str | None:
    """The name of a tensor of `module` holding NaN or infinity, if one does (a bake looks
    only once a baked weight came out non-finite)."""
    import torch

    if module.alpha is not None and not math.isfinite(module.alpha):
        return module.key_of("alpha")
    for role, tensor in module.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return module.key_of(role)
    return None


def bake_metadata(plan: BakePlan, base_sha256: str) -> dict[str, str]:
    """The base's own metadata, plus what was baked in: our recipe form (so `catalog lineage`
    shows the base and every LoRA as parents, and `recipe extract` gives a recipe that bakes
    the same weights: inputs recorded as merges record them, `recorded_ref`) and a plain list
    (the LoRAs' file names, never their folders)."""
    names = _model_names(plan)
    loras = []
    for use, name in zip(plan.uses, names[1:], strict=True):
        entry = {"model": name, "strength": use.strength}
        if use.te_strength is not None:
            entry["te_strength"] = use.te_strength
        if use.blocks not in (None, ""):
            entry["blocks"] = use.blocks
        loras.append(entry)
    shas = [base_sha256, *(plan.lora_sha256s or [UNKNOWN_SHA256] * len(plan.uses))]
    folder = plan.output.parent
    refs = [recorded_ref(plan.base_ref, plan.base, folder),
            *(recorded_ref(u.ref, u.path, folder) for u in plan.uses)]
    step = {"name": "bake", "method": "bake_lora", "inputs": [names[0]], "loras": loras}
    if plan.allow_unmatched:  # as a recipe's step records it (merge/provenance.py)
        step["allow_unmatched"] = True
    recipe = {
        "version": 1,
        "models": {n: {"ref": r, "sha256": s} for n, r, s in zip(names, refs, shas, strict=True)},
        "steps": [step],
        # a bake writes every tensor of the base, EMA too, where a recipe drops EMA by default
        "output": {"step": "bake", "dtype": plan.dtype, "title": plan.output.stem,
                   "drop_ema": False},
    }
    metadata = dict(plan.header.metadata)
    metadata.pop(META_RECIPE_OUTPUT, None)  # the recipe below makes this very file
    metadata.update(_a1111_metadata(plan, base_sha256))
    metadata.update({
        "modelspec.title": plan.output.stem,
        "mergekit_sd.recipe": json.dumps(recipe, sort_keys=True),
        META_BAKED_LORAS: json.dumps(
            [{"name": u.path.name, "sha256": s, **e}
             for u, s, e in zip(plan.uses, shas[1:], loras, strict=True)]),
        "mergekit_sd.version": __version__,
    })
    metadata.setdefault("format", "pt")
    return metadata


def _a1111_metadata(plan: BakePlan, base_sha256: str) -> dict[str, str]:
    """AUTOMATIC1111's merge keys and modelspec's lineage for the bake, as a recipe's bake_lora
    step writes them (merge/provenance.py): the base in the primary slot, its own keys nested
    under sd_merge_models. The base's would otherwise be copied, and a baked merge show as that
    plain merge in AUTOMATIC1111, Forge and Civitai."""
    prefix = _diffusion_prefix(plan.header)
    conv_in = next((plan.header.tensors[prefix + k].shape for k in SD_CONV_IN_KEYS
                    if prefix + k in plan.header.tensors), ())
    recipe = a1111_recipe({"primary": base_sha256}, {}, "bake_lora", None, plan.dtype == "fp16",
                          plan.output.stem, None, sd_conv_in_variant(tuple(conv_in)))
    models = a1111_models_entry(plan.header.metadata, plan.base.name, base_sha256,
                                legacy_model_hash(plan.base))
    return {"modelspec.date": dt.datetime.now(dt.UTC).date().isoformat(),
            "modelspec.merged_from": plan.base.name,
            "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def _model_names(plan: BakePlan) -> list[str]:
    names = ["base"]
    for use in plan.uses:
        stem, n = use.path.stem, 2
        name = stem
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def malformed(module: LoraModule) -> str | None:
    """What a LoRA/LoCon module lacks to be one (a file cut short, a faulty converter); None
    for the other algorithms, whose deltas tell (`shape_problem`)."""
    t = module.tensors
    if module.algo != "lora":
        return None
    missing = sorted({"up", "down"} - t.keys())
    if missing:
        return f"malformed: it has no {' and no '.join(missing)} tensor"
    up, down = tuple(t["up"].shape), tuple(t["down"].shape)
    if len(up) < 2 or len(down) < 2:
        return f"malformed: up {up} and down {down} are no factors"
    if down[0] == 0:
        return f"malformed: its rank is 0 (up {up}, down {down})"
    if "mid" not in t and math.prod(up[1:]) != down[0]:
        return f"malformed: up {up} has rank {math.prod(up[1:])} and down {down} rank {down[0]}"
    return None


def _dora_problem(module: LoraModule, shape: tuple[int, ...]) -> str | None:
    """Why a DoRA magnitude (`dora_scale`) fits neither form `apply_dora` reads, one value per
    output channel or (LyCORIS' wd_on_output=False) per input channel, or None."""
    magnitude = module.tensors.get("dora")
    if magnitude is None:
        return None
    out, inp = shape[0], shape[1] if len(shape) > 1 else None
    if magnitude.shape and magnitude.shape[0] == out and magnitude.numel() == out:
        return None
    if inp is not None and magnitude.numel() == inp:
        return None
    return (f"malformed: dora_scale {tuple(magnitude.shape)} holds {magnitude.numel()} "
            f"magnitudes, where {shape} takes one per output channel ({out}) or per input "
            f"channel ({inp})")


def shape_problem(module: LoraModule, shape: tuple[int, ...]) -> str | None:
    """Why `module`'s tensors cannot make a delta of `shape`, or None when they can; found
    while planning, before any byte is written."""
    t = module.tensors
    if module.algo == "lora" and "mid" not in t:  # cheap: no product needed
        problem = malformed(module)
        if problem:
            return problem
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        if t["up"].shape[0] != shape[0] or t["down"][0].numel() != width:
            return (f"up {tuple(t['up'].shape)} and down {tuple(t['down'].shape)} do not fit "
                    f"{shape}")
        return _dora_problem(module, shape)
    try:
        module_delta(module, shape)
    except DeltaShapeError as exc:
        return str(exc)
    return _dora_problem(module, shape)
