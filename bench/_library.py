"""The model library the catalog and inspect benchmarks run over: many LoRAs of every format
and sparse full-size checkpoints of every variant, as a user's folders mix them."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from mergekit_sd.testing import (
    CHECKPOINT_VARIANTS,
    LORA_FORMATS,
    write_checkpoint,
    write_lora,
)

LORA_SHARE = 0.85  # most people keep many LoRAs and fewer checkpoints


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a sparse model file: its header, then a hole up to the same size (a new inode)."""
    with open(src, "rb") as f:
        prefix = f.read(8)
        header = f.read(int.from_bytes(prefix, "little"))
        size = os.fstat(f.fileno()).st_size
    with open(dst, "wb") as f:
        f.write(prefix + header)
        f.truncate(size)


def build_library(root: Path, n_files: int) -> tuple[list[Path], dict[Path, str]]:
    """`n_files` model files: tiny LoRAs of every format and sparse full-size F16 checkpoints
    and components of every variant, each distinct kind written once and copied under many
    names (distinct inodes), shuffled as a folder listing would mix them."""
    proto = root / "proto"
    n_ckpt = round(n_files * (1 - LORA_SHARE))
    sources: list[tuple[Path, str]] = []
    for i in range(n_files - n_ckpt):
        fmt = LORA_FORMATS[i % len(LORA_FORMATS)]
        src = proto / f"lora-{fmt}.safetensors"
        if not src.exists():
            write_lora(src, fmt)
        sources.append((src, "lora"))
    for i in range(n_ckpt):
        variant = CHECKPOINT_VARIANTS[i % len(CHECKPOINT_VARIANTS)]
        src = proto / f"{variant}.safetensors"
        if not src.exists():
            write_checkpoint(src, variant, size="full", fill="sparse", dtype="F16")
        sources.append((src, "checkpoint"))
    library = root / "library"
    library.mkdir()
    paths, kinds = [], {}
    for i, (src, kind) in enumerate(sources):
        dst = library / f"{i:04d}-{src.name}"
        if kind == "lora":
            shutil.copyfile(src, dst)
        else:
            sparse_copy(src, dst)
        paths.append(dst)
        kinds[dst] = kind
    random.Random(0).shuffle(paths)
    return paths, kinds


def json_floor(paths: list[Path]) -> float:
    """Seconds for the floor of any Python header reader over `paths`: read each header and
    json.loads it, no checks, no identification."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return time.perf_counter() - start
