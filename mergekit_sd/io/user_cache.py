"""Where mergekit-sd keeps what it can always compute again (key maps, file hashes):
$MERGEKIT_SD_CACHE, else the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    configured = os.environ.get("MERGEKIT_SD_CACHE")
    if configured:
        return Path(configured)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mergekit-sd"))
