"""An on-disk cache of derived key maps, so that only the first bake or render of a layout pays
for importing diffusers and running its converters (about 4 s); later ones read a small JSON.

Entries are keyed by the file's header (every key and shape), the installed diffusers version
(the maps come from its converters) and a format number. A missing, unreadable or corrupt entry
is derived again; a cache folder that cannot be written is skipped silently: the cache only
ever saves time. The folder is $MERGEKIT_SD_CACHE, else the user cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from mergekit_sd.arch.keymap import ComponentMap, Segment, Source
from mergekit_sd.io.user_cache import cache_dir

FORMAT = 2  # 2: UNet-only files (bare ldm keys) have a unet map; 1 cached none
Maps = tuple[tuple[str, ComponentMap], ...]


def _entry(items: tuple) -> Path:
    try:
        diffusers = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        diffusers = "none"
    digest = hashlib.sha256(json.dumps([FORMAT, diffusers, items]).encode()).hexdigest()
    return cache_dir() / "keymaps" / f"{digest[:32]}.json"


def load(items: tuple) -> Maps | None:
    try:
        doc = json.loads(_entry(items).read_text())
        keys = doc["keys"]
        return tuple(
            (component, {name: Source(tuple(Segment(keys[k], a, b) for k, a, b in segments),
                                      bool(transposed))
                         for name, (segments, transposed) in entries.items()})
            for component, entries in doc["maps"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def save(items: tuple, maps: Maps) -> None:
    keys: dict[str, int] = {}  # checkpoint keys stored once, referred to by index
    doc = {"keys": [], "maps": [
        [component, {name: [[[keys.setdefault(s.key, len(keys)), s.start, s.stop]
                             for s in source.segments], source.transposed]
                     for name, source in mapping.items()}]
        for component, mapping in maps]}
    doc["keys"] = list(keys)
    path = _entry(items)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a unique temporary name: two processes may fill the same entry at once
        fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(partial, path)
    except OSError:
        Path(partial).unlink(missing_ok=True)
