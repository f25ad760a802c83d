"""What a scan records about one file, from its header alone (through `mergekit_sd.arch`).

`examine` runs in worker processes during a scan, so it takes a path and returns a small
picklable record, not the header itself.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from mergekit_sd.arch.identify import Identification, identify, sdxl_family
from mergekit_sd.arch.lora import trigger_words
from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.dtypes import SAFETENSORS_DTYPES
from mergekit_sd.io.header import MAX_HEADER_BYTES, SafetensorsHeader, read_header
from mergekit_sd.io.pickled import pickle_header, sniff_format

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LEGACY_PICKLE = ("a pickle in PyTorch's legacy format (saved before torch 1.6): a scan does not "
                 "load it, which would read every byte; `mergekit-sd convert` checks and "
                 "identifies it")
# our architecture ids -> the base-model labels Civitai (and so most users) call them by
CIVITAI_BASE_MODELS = {
    "sd1": "SD 1.5", "sd2": "SD 2.1", "sdxl": "SDXL 1.0", "sdxl-refiner": "SDXL 1.0",
    "sd3-medium": "SD 3", "sd3.5-medium": "SD 3.5 Medium", "sd3.5-large": "SD 3.5 Large",
    "flux-dev": "Flux.1 D", "flux-schnell": "Flux.1 S", "flux-fill": "Flux.1 D",
}
# text encoders and VAEs identified alone carry their own name as architecture
_PART_KINDS = ("vae", "text_encoder")


@dataclass
class Parent:
    ref_kind: str  # sha256, autov1, autov3, name
    ref: str
    name: str
    role: str


@dataclass
class FileFacts:
    # ok, truncated, invalid, unreadable, unchecked (a legacy pickle); gone: renamed or deleted
    # since the walk found it, so nothing to record (the next scan finds where it went)
    status: str
    problem: str | None = None
    kind: str | None = None
    architecture: str | None = None
    base_model: str | None = None
    label: str | None = None
    layout: str | None = None
    dtype: str | None = None
    parameters: int | None = None
    lora_format: str | None = None
    lora_rank: int | None = None
    trigger_words: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    parents: list[Parent] = field(default_factory=list)


def examine(path: str) -> FileFacts:
    """Identify one file from its header; a bad file gives a status and its sentence, never an
    exception (a scan goes on past it)."""
    facts = _examine(Path(path))
    if facts.status != "ok" and not os.path.lexists(path):
        return FileFacts("gone")
    return facts


def _examine(p: Path) -> FileFacts:
    if p.suffix.lower() in PICKLE_SUFFIXES and (facts := _examine_pickle(p)) is not None:
        return facts
    try:
        header = read_header(p, loads=orjson.loads)  # twice as fast as json on big headers
    except BadModelFile as exc:
        cut = exc.problem.startswith("is truncated") or _cut_inside_header(p)
        return FileFacts("truncated" if cut else "invalid", problem=exc.problem)
    except OSError as exc:  # read_header turns these into sentences; belt and braces
        return FileFacts("unreadable", problem=str(exc))
    return facts_from_header(header)


def _cut_inside_header(path: Path) -> bool:
    """A header length the format allows but the file cannot hold, its JSON begun: a download
    cut inside its header (a LoRA's is 100-400 KB). A saved error page or text reads as a
    length far over the limit."""
    try:
        with open(path, "rb") as f:
            start, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(start) < 9:
        return False
    (length,) = struct.unpack("<Q", start[:8])
    return size - 8 < length <= MAX_HEADER_BYTES and start[8:9] == b"{"


def _examine_pickle(path: Path) -> FileFacts | None:
    """A .ckpt/.pt/.pth/.bin file's facts from its contents, never running code from it (the
    safe loader, tensors memory-mapped: see pickled.pickle_tensor_shapes); None for a
    safetensors file under a pickle's name, which is read as one."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            kind = sniff_format(f.read(9), size)
    except OSError as exc:
        return FileFacts("unreadable", problem=f"cannot read it ({exc.strerror})")
    if kind == "safetensors":
        return None
    if kind == "unknown":  # a .pth path file of a Python venv, an error page, an empty file
        return FileFacts("invalid", problem="is not a PyTorch checkpoint (neither a zip archive "
                         "nor a pickle)" if size else "is empty")
    try:
        header = pickle_header(path)
    except BadModelFile as exc:
        status = "truncated" if "truncated" in exc.problem else "invalid"
        return FileFacts(status, problem=exc.problem)
    except (OSError, MemoryError) as exc:
        return FileFacts("unreadable", problem=f"cannot read it ({exc})")
    if header is None:
        return FileFacts("unchecked", problem=LEGACY_PICKLE)
    facts = facts_from_header(header)
    facts.details["format"] = "PyTorch pickle (zip)"
    return facts


def facts_from_header(header: SafetensorsHeader) -> FileFacts:
    found = identify(header)
    metadata = header.metadata
    dtype, parameters = _dtype_and_parameters(header)
    facts = FileFacts(
        "ok", kind=found.kind, architecture=found.architecture,
        base_model=base_model_label(found, metadata), label=found.label, layout=found.layout,
        dtype=dtype, parameters=parameters,
        trigger_words=trigger_words(metadata) if found.kind == "lora" else [],
        parents=parents_from_metadata(metadata),
        details={"evidence": found.evidence, "caveats": found.caveats,
                 "variant": found.variant, "prediction": found.prediction,
                 "title": metadata.get("modelspec.title")},
    )
    if found.lora is not None:
        facts.lora_format = found.lora.format
        facts.lora_rank = found.lora.rank
        facts.details["blocks"] = found.lora.blocks
    return facts


def _dtype_and_parameters(header: SafetensorsHeader) -> tuple[str | None, int]:
    """The dtype holding most bytes, and the number of parameters, in one pass over the
    tensors (a scan does this for every file)."""
    by_bytes: dict[str, int] = {}
    for info in header.tensors.values():
        by_bytes[info.dtype] = by_bytes.get(info.dtype, 0) + info.end - info.start
    parameters = sum(n * 8 // SAFETENSORS_DTYPES[d][0] for d, n in by_bytes.items())
    return (max(by_bytes, key=by_bytes.__getitem__) if by_bytes else None), parameters


def base_model_label(found: Identification, metadata: dict[str, str]) -> str | None:
    """Civitai's name for the base: the architecture's, or Pony / Illustrious / NoobAI when an
    SDXL file's metadata says so (the weights cannot; see identify's caveats)."""
    if found.kind in _PART_KINDS or found.architecture is None:
        return None
    if found.architecture == "sdxl":
        family = sdxl_family(metadata)
        if family:
            return family
    return CIVITAI_BASE_MODELS.get(found.architecture)


def parents_from_metadata(metadata: dict[str, str]) -> list[Parent]:
    """The models this file was made from, as its metadata names them: AUTOMATIC1111's
    `sd_merge_models` (sha256 -> name), our own recipe (inputs pinned by SHA256), the LoRAs a
    `lora merge` merged and the pair a `lora extract` took apart (each with its SHA256),
    kohya's training base (`ss_new_sd_model_hash` full, `ss_sd_model_hash` legacy AutoV1)."""
    parents: dict[tuple[str, str, str], Parent] = {}

    def add(kind: str, ref, name, role: str) -> None:
        if isinstance(ref, str) and ref.strip():
            ref = ref.strip().lower()
            parents.setdefault((kind, ref, role), Parent(kind, ref, str(name or ""), role))

    recipe = _json(metadata.get("mergekit_sd.recipe"))
    if isinstance(recipe, dict) and isinstance(recipe.get("models"), dict):
        roles = _recipe_roles(recipe)
        for name, model in recipe["models"].items():
            if isinstance(model, dict):
                add("sha256", model.get("sha256"), model.get("ref") or name,
                    roles.get(name, "merge input"))
        output = recipe.get("output") if isinstance(recipe.get("output"), dict) else {}
        add("sha256", output.get("vae_sha256"), output.get("vae"), "baked VAE")
    merged = _json(metadata.get("mergekit_sd.merged_loras"))
    for lora in merged if isinstance(merged, list) else []:
        if isinstance(lora, dict):
            add("sha256", lora.get("sha256"), lora.get("name"), "merged LoRA input")
    extracted = _json(metadata.get("mergekit_sd.extracted_from"))
    if isinstance(extracted, dict):
        for part, role in (("tuned", "extracted from (tuned)"), ("base", "extraction base")):
            model = extracted.get(part)
            if isinstance(model, dict):
                add("sha256", model.get("sha256"), model.get("name"), role)
    merge_models = _json(metadata.get("sd_merge_models"))
    if isinstance(merge_models, dict) and not parents:
        # AUTOMATIC1111 lists ancestors too; without a recipe to tell the direct inputs apart,
        # its direct inputs are the hashes its recipe names
        a1111 = _json(metadata.get("sd_merge_recipe"))
        a1111 = a1111 if isinstance(a1111, dict) else {}
        direct = {a1111.get(k) for k in ("primary_model_hash", "secondary_model_hash",
                                         "tertiary_model_hash")} - {None}
        for sha, info in merge_models.items():
            name = info.get("name") if isinstance(info, dict) else ""
            add("sha256", sha, name, "merge input" if sha in direct or not direct else "ancestor")
    base_name = metadata.get("ss_sd_model_name", "")
    if metadata.get("ss_new_sd_model_hash"):
        add("sha256", metadata["ss_new_sd_model_hash"], base_name, "training base")
    elif metadata.get("ss_sd_model_hash"):
        add("autov1", metadata["ss_sd_model_hash"], base_name, "training base")
    return list(parents.values())


def _recipe_roles(recipe: dict) -> dict[str, str]:
    """What each model of our recipe was to the file: a LoRA baked in ("baked LoRA"), the
    checkpoint LoRAs were baked into and nothing merged ("bake base"); the rest are merge
    inputs."""
    steps = [s for s in recipe.get("steps") or [] if isinstance(s, dict)]

    def names(items) -> set[str]:
        return {n for n in items if isinstance(n, str)} if isinstance(items, list) else set()

    loras = {lora.get("model") for s in steps if isinstance(s.get("loras"), list)
             for lora in s["loras"] if isinstance(lora, dict)}
    baked_into = set().union(*(names(s.get("inputs")) for s in steps
                               if s.get("method") == "bake_lora"))
    merged = set().union(*(names(s.get("inputs")) for s in steps
                           if s.get("method") != "bake_lora"))
    roles = dict.fromkeys(baked_into - merged, "bake base")
    roles.update({n: "baked LoRA" for n in loras if isinstance(n, str)})
    return roles


def _json(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # nested deeper than the parser goes: unreadable too
        return None

