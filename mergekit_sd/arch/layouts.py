"""The real key layouts of public single-file checkpoints, shipped as data (layouts/*.json.gz).

Each layout lists, per component (diffuser, clip_l, clip_g, t5xxl, vae, ema, scheduler), every
key with its shape and dtype; `optional` keys appear in some releases only, and `aliases` give
the names the same tensor has in other files (e.g. bare BFL names of a transformer-only FLUX
file). Used to generate realistic synthetic checkpoints, never needed to identify a file.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

LAYOUT_NAMES = ("sd1-ldm", "sdxl-sgm", "sd3-medium-comfyui", "flux1-dev-bfl")

# layout JSON dtype names -> safetensors names
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32"}


@dataclass(frozen=True, slots=True)
class LayoutKey:
    name: str
    component: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name
    optional: bool
    aliases: tuple[str, ...]


@cache
def load_layout(name: str) -> tuple[LayoutKey, ...]:
    """All keys of layout `name` (one of LAYOUT_NAMES), in file order."""
    if name not in LAYOUT_NAMES:
        raise KeyError(f"unknown layout {name!r}; known: {', '.join(LAYOUT_NAMES)}")
    raw = resources.files(__package__).joinpath(f"layouts/{name}.json.gz").read_bytes()
    doc = json.loads(gzip.decompress(raw))
    return tuple(
        LayoutKey(key, component, tuple(entry["shape"]), _DTYPE_NAMES[entry["dtype"]],
                  bool(entry.get("optional")), tuple(entry.get("aliases", ())))
        for component, keys in doc["components"].items()
        for key, entry in keys.items()
    )
