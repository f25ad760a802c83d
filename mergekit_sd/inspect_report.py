"""`mergekit-sd inspect`: identify files from their headers and show it as tables or JSON.

Reads only headers, plus a LoRA's few alpha scalars: those are the alphas that apply (bake uses
them), whatever the training metadata says. A zip pickle (.ckpt/.pt/.pth/.bin) is identified
from its small pickle as a catalog scan identifies it, never running code from it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.arch.lora import trigger_words
from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.header import SafetensorsHeader, read_header
from mergekit_sd.io.pickled import PICKLE_SUFFIXES, pickle_header, sniff_format
from mergekit_sd.io.reader import SafetensorsReader, read_scalar

# kohya training metadata worth a line; the rest is shown with --verbose
KOHYA_SUMMARY = ("ss_output_name", "ss_base_model_version", "ss_sd_model_name",
                 "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_num_epochs",
                 "ss_steps", "ss_resolution", "ss_learning_rate", "ss_training_started_at")


def inspect_file(path: Path, all_metadata: bool = False) -> dict:
    """Everything inspect reports about one file, as plain data (the --json shape);
    `all_metadata` keeps every metadata value rather than a summary."""
    header = _pickle_header(path) if path.suffix.lower() in PICKLE_SUFFIXES else None
    pickle = header is not None
    if header is None:
        header = read_header(path)
    ident = identify(header)
    report = {
        "path": str(path),
        "file_size": header.file_size,
        "status": f"a PyTorch pickle (zip checkpoint): {len(header.tensors)} tensors, read by "
                  "torch's safe loader without running code; convert it to safetensors to "
                  "merge it" if pickle else
                  f"complete: {len(header.tensors)} tensors, data area of "
                  f"{header.data_bytes} bytes as declared",
        "header_bytes": None if pickle else header.header_bytes,
        **ident.to_dict(),
        "dtypes": dict(Counter(info.dtype for info in header.tensors.values())),
        "parameters": sum(c.parameters for c in ident.components)
        if ident.components else _parameters(header),
        "metadata": summarise_metadata(header.metadata, all_metadata),
    }
    if ident.lora is not None:
        report["lora"]["alpha"], report["lora"]["alpha_note"] = _lora_alpha(header, ident) \
            if not pickle else (None, "not read from a pickle; convert it to see it")
        report["lora"]["rank"] = ident.lora.rank
        report["lora"]["trigger_words"] = trigger_words(header.metadata)
        report["parameters"] = _parameters(header)
    return report


def _pickle_header(path: Path) -> SafetensorsHeader | None:
    """A .ckpt/.pt/.pth/.bin file's tensors, identified as a catalog scan identifies them
    (`pickle_header`: torch's safe loader, tensors memory-mapped, nothing run); None for a
    safetensors file under a pickle's name, read as one. BadModelFile, with the sentence the
    scan records, for one that would run code, a truncated or corrupt one, a legacy pickle
    (which the loader can only read whole) and a file that is no checkpoint."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        kind = sniff_format(f.read(9), size)
    if kind == "safetensors":
        return None
    if kind == "unknown":
        raise BadModelFile(path, "is not a PyTorch checkpoint (neither a zip archive nor a "
                                 "pickle)" if size else "is empty")
    header = pickle_header(path)
    if header is None:
        raise BadModelFile(path, "is a pickle in PyTorch's legacy format (saved before torch "
                                 "1.6), which inspect does not load (that would read every "
                                 "byte); `mergekit-sd convert` checks it and writes a "
                                 "safetensors file inspect reads")
    return header


def _parameters(header: SafetensorsHeader) -> int:
    total = 0
    for info in header.tensors.values():
        total += info.numel
    return total


def _lora_alpha(header: SafetensorsHeader, ident: Identification):
    """(alpha, note): the alpha tensors' distinct values (one number, a list, or None when
    none are stored and alpha is the rank), and a note on values that are no numbers or on
    training metadata that says otherwise (kohya's dynamic resize writes "Dynamic")."""
    said = header.metadata.get("ss_network_alpha")
    keys = ident.lora.alpha_keys
    if not keys and not ident.lora.ranks:  # full diffs: whole weight changes, no rank to scale
        return None, None
    if not keys:
        from_config = _peft_metadata_alpha(header)
        if from_config[0] is not None:
            return from_config
        return None, (f"ss_network_alpha says {said}, but no alpha is stored" if said else None)
    values, invalid = _alpha_values(header, keys)
    notes = [f"{n} alpha tensor(s) {problem}" for problem, n in sorted(invalid.items())]
    if said and values and _number(said) not in values:
        notes.append(f"ss_network_alpha says {said}; the tensors' values apply")
    alpha = sorted(values)
    return (alpha[0] if len(alpha) == 1 else alpha or None), "; ".join(notes) or None


def _peft_metadata_alpha(header: SafetensorsHeader):
    """(alpha, note) from diffusers' PEFT config in `lora_adapter_metadata`, as bake scales by
    it (`peft_alpha`): the distinct values, and the note naming them by component; (None,
    None) when it gives none."""
    from mergekit_sd.lora.modules import group_modules, peft_alpha, peft_configs

    configs = peft_configs(header.metadata)
    if not configs:
        return None, None
    by_part: dict[str, set[float]] = {}
    unset = 0  # modules no config gives an alpha: scaled by alpha = rank
    for module, roles in group_modules(header)[0].items():
        down = header.tensors.get(roles.get("down", ""))
        alpha = peft_alpha(module, down.shape[0] if down and down.shape else None, configs)
        if alpha is not None and math.isfinite(alpha):
            part = next((p for p in sorted(configs, key=len, reverse=True)
                         if p and module.startswith(p + ".")), "")
            by_part.setdefault(part, set()).add(round(alpha, 4))
        else:
            unset += 1
    if not by_part:
        return None, None
    values = sorted(set().union(*by_part.values()))
    parts = ", ".join(f"{part or 'every module'} {', '.join(f'{v:g}' for v in sorted(vals))}"
                      for part, vals in sorted(by_part.items()))
    rest = f"; {unset} other modules none (= rank)" if unset else ""
    return ((values[0] if len(values) == 1 else values),
            f"from lora_adapter_metadata: {parts}{rest}")


def _alpha_values(header: SafetensorsHeader, keys: list[str]) -> tuple[set[float], Counter]:
    """The finite alpha values (rounded), and a count of the others by what is wrong."""
    values: set[float] = set()
    invalid: Counter = Counter()
    with SafetensorsReader(header.path, header) as reader:
        for key in keys:
            try:
                value = read_scalar(reader, key)
            except ValueError:  # empty, BOOL, FP8 ...: nothing bake could use
                invalid[f"not a number ({reader.tensors[key].dtype}, "
                        f"shape {list(reader.tensors[key].shape)})"] += 1
                continue
            if math.isfinite(value):
                values.add(round(value, 4))
            else:
                invalid[f"{value} (invalid)"] += 1
    return values, invalid


def _number(text: str) -> float | None:
    try:
        return round(float(text), 4)
    except ValueError:
        return None


def summarise_metadata(metadata: dict[str, str], everything: bool = False) -> dict:
    """modelspec.* in full, kohya ss_* summarised, merge recipes parsed; the rest named.
    `everything` (--verbose, --json) keeps every ss_* key and the other keys' values too."""
    summary: dict = {}
    modelspec = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    if modelspec:
        summary["modelspec"] = modelspec
    kohya = {k: metadata[k] for k in KOHYA_SUMMARY if k in metadata}
    if everything:
        kohya.update((k, metadata[k]) for k in sorted(metadata) if k.startswith("ss_"))
    if kohya:
        summary["kohya"] = kohya
    for key in ("sd_merge_recipe", "sd_merge_models", "mergekit_sd.recipe"):
        if key in metadata:
            summary[key] = _parsed(metadata[key])
    others = sorted(k for k in metadata if not k.startswith(("modelspec.", "ss_"))
                    and k not in summary)
    if others:
        summary["other_keys"] = others
        if everything:
            summary["other"] = {k: metadata[k] for k in others}
    return summary


def _parsed(text: str):
    """A metadata value holding JSON, parsed; kept as written when it is not strict JSON
    (NaN and Infinity, which json.loads accepts but no strict reader of --json would)."""
    def refuse(constant: str):
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser
        return text


def inspect_files(paths: list[Path], as_json: bool = False, verbose: bool = False) -> int:
    """Inspect every file; bad files get one sentence each. Returns the exit code (2 if any)."""
    reports, errors = [], []
    for path in paths:
        try:
            reports.append(inspect_file(path, all_metadata=verbose or as_json))
        except BadModelFile as exc:
            errors.append({"path": str(path), "error": str(exc)})
        except OSError as exc:
            errors.append({"path": str(path), "error": f"{path}: {os.strerror(exc.errno or 0)}"})
    if as_json:
        print(json.dumps(reports + errors, indent=2, default=str, allow_nan=False))
    else:
        from mergekit_sd.inspect_view import show_reports

        show_reports(reports, detailed=verbose or len(paths) == 1)
    if errors:
        import sys

        for error in errors:
            sys.stderr.write(f"error: {error['error']}\n")
        return 2
    return 0
