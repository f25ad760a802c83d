"""`mergekit-sd inspect`: identify files from their headers and show it as tables or JSON.

Reads only headers, plus a LoRA's few alpha scalars when its metadata does not state them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.arch.lora import trigger_words
from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.header import SafetensorsHeader, read_header
from mergekit_sd.io.reader import SafetensorsReader, read_scalar

# kohya training metadata worth a line; the rest is shown with --verbose
KOHYA_SUMMARY = ("ss_output_name", "ss_base_model_version", "ss_sd_model_name",
                 "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_num_epochs",
                 "ss_steps", "ss_resolution", "ss_learning_rate", "ss_training_started_at")


def inspect_file(path: Path) -> dict:
    """Everything inspect reports about one file, as plain data (the --json shape)."""
    header = read_header(path)
    ident = identify(header)
    report = {
        "path": str(path),
        "file_size": header.file_size,
        "status": f"complete: {len(header.tensors)} tensors, data area of "
                  f"{header.data_bytes} bytes as declared",
        "header_bytes": header.header_bytes,
        **ident.to_dict(),
        "dtypes": dict(Counter(info.dtype for info in header.tensors.values())),
        "parameters": sum(c.parameters for c in ident.components)
        if ident.components else _parameters(header),
        "metadata": summarise_metadata(header.metadata),
    }
    if ident.lora is not None:
        report["lora"]["alpha"] = _lora_alpha(header, ident)
        report["lora"]["rank"] = ident.lora.rank
        report["lora"]["trigger_words"] = trigger_words(header.metadata)
        report["parameters"] = _parameters(header)
    return report


def _parameters(header: SafetensorsHeader) -> int:
    total = 0
    for info in header.tensors.values():
        total += info.numel
    return total


def _lora_alpha(header: SafetensorsHeader, ident: Identification):
    said = header.metadata.get("ss_network_alpha")
    if said:
        return said
    keys = ident.lora.alpha_keys
    if not keys:
        return None  # no alpha stored: it defaults to the rank
    with SafetensorsReader(header.path, header) as reader:
        values = sorted({round(read_scalar(reader, k), 4) for k in keys})
    return values[0] if len(values) == 1 else values


def summarise_metadata(metadata: dict[str, str]) -> dict:
    """modelspec.* in full, kohya ss_* summarised, merge recipes parsed; the rest counted."""
    summary: dict = {}
    modelspec = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    if modelspec:
        summary["modelspec"] = modelspec
    kohya = {k: metadata[k] for k in KOHYA_SUMMARY if k in metadata}
    if kohya:
        summary["kohya"] = kohya
    for key in ("sd_merge_recipe", "sd_merge_models", "mergekit_sd.recipe"):
        if key in metadata:
            try:
                summary[key] = json.loads(metadata[key])
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                summary[key] = metadata[key]
    others = [k for k in metadata if not k.startswith(("modelspec.", "ss_"))
              and k not in summary]
    if others:
        summary["other_keys"] = sorted(others)
    return summary


def inspect_files(paths: list[Path], as_json: bool = False, verbose: bool = False) -> int:
    """Inspect every file; bad files get one sentence each. Returns the exit code (2 if any)."""
    reports, errors = [], []
    for path in paths:
        try:
            reports.append(inspect_file(path))
        except BadModelFile as exc:
            errors.append({"path": str(path), "error": str(exc)})
        except OSError as exc:
            errors.append({"path": str(path), "error": f"{path}: {os.strerror(exc.errno or 0)}"})
    if as_json:
        print(json.dumps(reports + errors, indent=2, default=str))
    else:
        from mergekit_sd.inspect_view import show_reports

        show_reports(reports, detailed=verbose or len(paths) == 1)
    if errors:
        import sys

        for error in errors:
            sys.stderr.write(f"error: {error['error']}\n")
        return 2
    return 0
