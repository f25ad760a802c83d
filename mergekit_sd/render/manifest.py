"""The manifest of a render: every image with what produced it (candidate ref and hash, recipe,
prompt, seed, preset, scheduler, steps, guidance, size, device, timings), for scripts and for
reproducing a sheet."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"


@dataclass
class ImageEntry:
    file: str  # relative to the output folder
    candidate: str
    candidate_ref: str
    candidate_sha256: str | None  # None for a merge computed in memory (see recipe)
    recipe: dict | None
    prompt_name: str
    prompt: str
    negative: str | None
    seed: int
    preset: str
    scheduler: str
    steps: int
    guidance: float
    width: int
    height: int
    device: str
    lora: str | None
    seconds: float  # this image's share of its batch's wall time


@dataclass
class CandidateEntry:
    label: str
    ref: str
    family: str
    path: str | None
    sha256: str | None
    recipe: dict | None
    load_s: float  # building the pipeline (first of an architecture) or swapping weights in
    render_s: float
    images: int
    # the candidate each pipeline component's weights came from: a UNet-only file renders
    # with the text encoders and VAE of the checkpoint its pipeline was built from
    components: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineEntry:
    family: str
    built_from: str
    build_s: float
    dtype: str
    preset: str
    scheduler: str
    steps: int
    guidance: float
    lora: dict | None
    batch_size: int
    # component -> the file given with --text-encoder or --vae that supplied it to the
    # candidates lacking it: option, ref, path, model (CLIP-L ...), sha256
    parts: dict[str, dict] = field(default_factory=dict)


@dataclass
class Manifest:
    tool: str
    command: str
    grid: dict
    device: str
    # false from the start of a run until its last file is written: a run stopped half-way
    # leaves a manifest saying so (see folder.py)
    complete: bool = False
    pipelines: list[PipelineEntry] = field(default_factory=list)
    candidates: list[CandidateEntry] = field(default_factory=list)
    # written again after each batch: a run stopped half-way lists the images it completed
    images: list[ImageEntry] = field(default_factory=list)
    sheets: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # worth a line on the terminal
    # every file of the run, relative to the folder, listed before the first is written: the
    # files a later run with --overwrite may remove (and no others)
    outputs: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        # allow_nan=False: NaN and Infinity are not JSON (jq and browsers refuse the file)
        text = json.dumps(asdict(self), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        return text.encode("utf-8")


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
