"""The merge engine's resolver for catalog references (`catalog:NAME`, `sha256:HEX`, ids).

The engine asks for a path and, when known, the SHA256 (which saves hashing the input again
for the output's provenance). `hf://` and `civitai://` references resolve to the catalog copy
of the file they name once the download clients register their source ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from catalog.entries import find_entry
from catalog.hash_cache import cached_hashes
from catalog.store import Store
from mergekit_sd.errors import UserError
from mergekit_sd.recipe.refs import ResolvedModel


class CatalogResolver:
    def __init__(self, store: Store):
        self.store = store

    def __call__(self, ref: str) -> ResolvedModel:
        """The file `ref` names; LookupError with one sentence when there is none (the
        planner adds the recipe's file, line and field)."""
        if ref.startswith(("hf://", "civitai://")):
            raise LookupError(f"{ref!r}: download references are not resolvable yet; download "
                              "the file, scan it into the catalog and refer to it as "
                              "catalog:NAME")
        try:
            entry = find_entry(self.store, ref)
        except UserError as exc:
            raise LookupError(str(exc)) from None
        if entry.status == "missing" or not os.path.exists(entry.path):
            raise LookupError(f"{ref!r} is catalog entry #{entry.id}, whose file {entry.path} "
                              "is missing; run `mergekit-sd catalog scan` or give a path")
        path = Path(entry.path)
        cached = cached_hashes(self.store, path)
        return ResolvedModel(path, cached.sha256 if cached else None)
