"""Synthetic textual inversion embeddings in the two safetensors layouts trainers write."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_sd.io.writer import TensorSpec
from mergekit_sd.testing.checkpoints import write_specs

# base -> tensor names and token widths: one vector set per text encoder
EMBEDDING_BASES = {
    "sd1": (("emb_params", 768),),
    "sd2": (("emb_params", 1024),),
    "sdxl": (("clip_l", 768), ("clip_g", 1280)),
}


def write_embedding(path: str | os.PathLike, base: str, vectors: int = 4, seed: int = 0) -> Path:
    """Write a `vectors`-token embedding for `base` (sd1, sd2, sdxl) and return its path."""
    specs = [TensorSpec(name, "F32", (vectors, width)) for name, width in EMBEDDING_BASES[base]]
    return write_specs(Path(path), specs, seed, {})
