"""Extract a kohya-format LoRA from two checkpoints: the difference, by truncated SVD.

For every weight a LoRA can carry (linear layers and 1x1 convs; 3x3 convs with a conv rank),
ΔW = tuned − base is factored as U·S·Vᵀ and the top `rank` singular directions kept:
lora_up = U·S, lora_down = Vᵀ. At full rank this is exact (to fp32 rounding), so baking the
result into the base gives the tuned model back. The factors' outliers can be clamped at a
quantile of their magnitudes (`clamp_quantile`, 1 = no clamp); kohya's script clamps at the
quantile of the signed values instead, which gives another limit. The two checkpoints are
read one weight at a time; only the (small) factors are held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.arch.architectures import ARCHITECTURES
from mergekit_sd.arch.identify import identify
from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.dtypes import LORA_DTYPES, parse_dtype
from mergekit_sd.io.hashing import file_sha256
from mergekit_sd.io.header import read_header
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.saturate import Clamped
from mergekit_sd.io.writer import refuse_replacing_inputs
from mergekit_sd.lora.compat import same_network
from mergekit_sd.lora.kohya_file import factors_for, write_kohya_lora
from mergekit_sd.lora.targets import DIFFUSION, TargetIndex
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress

# weights a LoRA never carries even though they are matrices: lookup tables, not layers
_NOT_LAYERS = ("embedding", "pos_embed", "position", "shared.weight")


@dataclass
class ExtractReport:
    output: Path
    modules: int = 0
    unchanged: int = 0  # weights that do not differ: no module written
    skipped_convs: int = 0  # 3x3 convs that differ, left out for want of a conv rank
    other_differences: list[str] = field(default_factory=list)  # differ, no LoRA can carry
    # in one model only, or of another shape in each (an inpainting conv_in): "KEY (why)"
    unlike: list[str] = field(default_factory=list)
    text_encoders_left_out: int = 0  # text-encoder weights that differ (--no-text-encoders)
    parts_left_out: str | None = None  # one file holds the diffusion model alone: what it means
    clamped: Clamped = field(default_factory=Clamped)  # factors beyond the output dtype


def truncated_svd(delta, rank: int, clamp_quantile: float):
    import torch

    matrix = delta.reshape(delta.shape[0], -1)
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile < 1:
        magnitudes = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
        k = max(1, math.ceil(clamp_quantile * magnitudes.numel()))
        limit = magnitudes.kthvalue(k).values
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up, down


def extract_lora(tuned: Path, base: Path, output: Path, rank: int, conv_rank: int | None = None,
                 clamp_quantile: float = 0.99, text_encoders: bool = True, dtype: str = "fp16",
                 progress: ProgressCallback = no_progress, cancel: CancelToken | None = None
                 ) -> ExtractReport:
    import torch

    if rank < 1 or (conv_rank is not None and conv_rank < 0):
        raise UserError("--rank must be at least 1 and --conv-rank at least 0")
    if not 0 < clamp_quantile <= 1:
        raise UserError(f"--clamp-quantile {clamp_quantile}: give a number in (0, 1]")
    dtype = parse_dtype(dtype, LORA_DTYPES, "lora extract")
    cancel = cancel or CancelToken()
    refuse_replacing_inputs(Path(output), [tuned, base])
    headers = {p: read_header(p) for p in (tuned, base)}
    found = {p: identify(h) for p, h in headers.items()}
    for path, ident in found.items():
        if ident.kind not in ("checkpoint", "diffusion_model") or \
                ident.architecture not in ARCHITECTURES:
            raise BadModelFile(path, f"is {ident.label}, not a checkpoint to extract from")
    arch = ARCHITECTURES[found[base].architecture]
    if not same_network(ARCHITECTURES[found[tuned].architecture], arch):
        raise UserError(f"{tuned.name} is {found[tuned].label} and {base.name} is "
                        f"{found[base].label}: a LoRA is extracted from two models of one "
                        "architecture")
    report = ExtractReport(output)
    names, tensors_t, tensors_b = _aligned(tuned, base, headers, found, arch, report)
    shapes = {k: i.shape for k, i in tensors_b.items()}
    index = TargetIndex(shapes, arch, _DIFFUSION_PREFIX if _prefixed(shapes) else "")
    carried = [(key, rows, name) for (key, rows), name in index.kohya.items()
               if key in tensors_t and tensors_t[key].shape == shapes[key]
               and len(shapes[key]) in (2, 4) and not any(n in key for n in _NOT_LAYERS)]
    wanted = [c for c in carried if text_encoders or index.find(c[2]).slot == DIFFUSION]
    modules = {}
    covered = {key for key, _, _ in carried}  # the rest: tensors no LoRA carries
    with SafetensorsReader(tuned) as tuned_reader, SafetensorsReader(base) as rb:
        rt = _Renamed(tuned_reader, names)
        if not text_encoders:  # left out on request: said apart from what no LoRA can carry
            left_out = {key for key, _, _ in carried} - {key for key, _, _ in wanted}
            report.text_encoders_left_out = sum(
                not torch.equal(rt.read_tensor(key), rb.read_tensor(key)) for key in left_out)
        for done, (key, rows, name) in enumerate(wanted, 1):
            cancel.raise_if_cancelled()
            kernel = tuple(shapes[key][2:])
            spatial = bool(kernel) and kernel != (1, 1)
            module_rank = (conv_rank or 0) if spatial else rank
            delta = rt.read_tensor(key).float() - rb.read_tensor(key).float()
            _check_finite(delta, key, rt, rb, tuned, base)
            if rows is not None:
                delta = delta[rows[0]:rows[1]]
            progress("extracting", done, len(wanted))
            if not bool(delta.any()):
                report.unchanged += 1
                continue
            if module_rank == 0:
                report.skipped_convs += 1
                continue
            up, down = truncated_svd(delta, module_rank, clamp_quantile)
            modules[name] = factors_for(up, down, kernel)
        report.other_differences = _other_differences(rt, rb, covered, tensors_t, tensors_b)
    report.unlike = _unlike(tensors_t, tensors_b, tuned.name, base.name)
    report.modules = len(modules)
    if not modules:
        raise UserError(f"{tuned.name} and {base.name} do not differ in any weight a LoRA can "
                        "carry; nothing to extract")
    provenance = {"mergekit_sd.extracted_from": {
        "tuned": {"name": tuned.name, "sha256": file_sha256(tuned)},
        "base": {"name": base.name, "sha256": file_sha256(base)},
        "rank": rank, "conv_rank": conv_rank, "clamp_quantile": clamp_quantile}}
    write_kohya_lora(output, modules, arch, dtype, provenance, report.clamped)
    return report


def _check_finite(delta, key: str, rt, rb, tuned: Path, base: Path) -> None:
    """A weight holding NaN or infinity has no singular values (the SVD fails): refused,
    naming the file and the weight (one `aminmax` read of the difference when all is well)."""
    import torch

    low, high = torch.aminmax(delta)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    for path, reader, name in ((tuned, rt, rt.names[key]), (base, rb, key)):
        if not bool(torch.isfinite(reader.read_tensor(name)).all()):
            raise UserError(f"{path.name}: {name} holds NaN or infinite values, so no LoRA can "
                            "be extracted from it; nothing written")
    raise UserError(f"{key}: the difference of the two models goes beyond float32's range; "
                    "nothing written")


_DIFFUSION_PREFIX = "model.diffusion_model."


def _prefixed(keys) -> bool:
    return any(k.startswith(_DIFFUSION_PREFIX) for k in keys)


class _Renamed:
    """A reader of TUNED that reads each tensor by its name in BASE."""

    def __init__(self, reader: SafetensorsReader, names: dict[str, str]):
        self.reader, self.names = reader, names

    def read_tensor(self, key: str):
        return self.reader.read_tensor(self.names[key])


def _aligned(tuned: Path, base: Path, headers: dict, found: dict, arch, report: ExtractReport):
    """(BASE name -> TUNED name, TUNED's tensors by BASE's names, BASE's tensors compared):
    a diffusion model saved alone (ComfyUI's "save UNet", a bare FLUX transformer) names its
    weights without the `model.diffusion_model.` of a whole checkpoint, so its keys are matched
    to the checkpoint's, whose other parts (text encoders, VAE) are left out, as
    `report.parts_left_out` says. Two files that share no name are refused in one sentence."""
    tensors_t, tensors_b = headers[tuned].tensors, headers[base].tensors
    names = {k: k for k in tensors_t}
    prefixed_t, prefixed_b = _prefixed(tensors_t), _prefixed(tensors_b)
    alone = None
    if prefixed_b and not prefixed_t and found[tuned].kind == "diffusion_model":
        names = {_DIFFUSION_PREFIX + k: k for k in tensors_t}
        alone, whole = tuned, base
        left = [k for k in tensors_b if not k.startswith(_DIFFUSION_PREFIX)]
        tensors_b = {k: i for k, i in tensors_b.items() if k.startswith(_DIFFUSION_PREFIX)}
    elif prefixed_t and not prefixed_b and found[base].kind == "diffusion_model":
        names = {k[len(_DIFFUSION_PREFIX):]: k for k in tensors_t
                 if k.startswith(_DIFFUSION_PREFIX)}
        alone, whole = base, tuned
        left = [k for k in tensors_t if not k.startswith(_DIFFUSION_PREFIX)]
    if alone is not None:
        part = "transformer" if arch.family in ("flux", "sd3") else "UNet"
        report.parts_left_out = (f"{alone.name} holds the {part} alone: only the {part}s were "
                                 f"compared, and the {len(left)} other tensors of {whole.name} "
                                 "(text encoders, VAE) left out")
    aligned = {b: tensors_t[t] for b, t in names.items()}
    if not aligned.keys() & tensors_b.keys():
        layouts = [found[p].layout for p in (tuned, base)]
        which = f" ({layouts[0]} and {layouts[1]} key layouts)" if all(layouts) else ""
        raise UserError(f"{tuned.name} and {base.name} share no tensor name{which}, so nothing "
                        "can be compared; extract from two files of one key layout")
    return names, aligned, tensors_b


def _other_differences(rt, rb, covered: set[str], tensors_t, tensors_b) -> list[str]:
    """Tensors outside the LoRA's reach (biases, norms, embeddings) that differ: reported, so
    a user knows what the LoRA leaves out."""
    import torch

    differ = []
    for key, info in tensors_b.items():
        if key in covered or key not in tensors_t or tensors_t[key].shape != info.shape:
            continue
        if info.nbytes > 64 << 20:  # a huge non-layer tensor: not worth reading twice
            continue
        if not torch.equal(rt.read_tensor(key), rb.read_tensor(key)):
            differ.append(key)
    return differ


def _unlike(tensors_t, tensors_b, tuned: str, base: str) -> list[str]:
    """Tensors no LoRA can carry because the two models do not share them as they are: each
    as "KEY (why)"."""
    found = []
    for key, info in tensors_b.items():
        if key not in tensors_t:
            found.append(f"{key} (only in {base})")
        elif tensors_t[key].shape != info.shape:
            found.append(f"{key} ({list(tensors_t[key].shape)} in {tuned}, "
                         f"{list(info.shape)} in {base})")
    found += [f"{key} (only in {tuned})" for key in tensors_t if key not in tensors_b]
    return found
