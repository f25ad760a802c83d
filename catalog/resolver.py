"""The merge engine's resolver for catalog references (`catalog:NAME`, `sha256:HEX`, ids) and
download references (`hf://org/repo/file`, `civitai://VERSION_ID`, `civitai://model/ID`).

The engine asks for a path and, when known, the SHA256 (which saves hashing the input again
for the output's provenance). A download reference resolves to the catalog's copy of the file
it names (found by the source ids a pull records); when there is none, the caller's `fetch`
(`plan`/`merge --pull`) pulls it first, and without one the answer says how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from catalog.entries import Entry, find_entry
from catalog.hash_cache import cached_hashes
from catalog.remote_refs import HubRef, is_remote_ref, owned_entry, parse_remote_ref
from catalog.store import Store
from mergekit_sd.errors import UserError
from mergekit_sd.recipe.refs import ResolvedModel


class CatalogResolver:
    def __init__(self, store: Store, fetch: Callable[[str], None] | None = None,
                 offline: bool = False):
        self.store = store
        self.fetch = fetch  # pulls a download reference into the catalog (--pull)
        self.offline = offline  # --offline: the answer for a missing copy says what works

    def __call__(self, ref: str) -> ResolvedModel:
        """The file `ref` names; LookupError with one sentence when there is none (the
        planner adds the recipe's file, line and field)."""
        entry = self._download(ref) if is_remote_ref(ref) else self._entry(ref)
        if entry.status == "missing" or not os.path.exists(entry.path):
            raise LookupError(f"{ref!r} is catalog entry #{entry.id}, whose file {entry.path} "
                              "is missing; run `mergekit-sd catalog scan` or give a path")
        path = Path(entry.path)
        cached = cached_hashes(self.store, path)
        return ResolvedModel(path, cached.sha256 if cached else None)

    def _entry(self, ref: str) -> Entry:
        try:
            return find_entry(self.store, ref)
        except UserError as exc:
            raise LookupError(str(exc)) from None

    def _download(self, ref: str) -> Entry:
        try:
            parsed = parse_remote_ref(ref)
            if isinstance(parsed, HubRef) and parsed.is_pattern:  # checked before any download
                raise UserError(f"{ref!r} is a pattern, and a recipe input must name one file; "
                                f"write its path (`mergekit-sd search hf {parsed.repo} --files` "
                                "lists them)")
            entry = owned_entry(self.store, parsed)
            if entry is None and self.fetch is not None:
                self.fetch(ref)
                entry = owned_entry(self.store, parsed)
        except UserError as exc:  # a network failure (WorkFailed) stays one: exit code 1
            raise LookupError(str(exc)) from None
        if entry is None:
            raise no_copy_yet(ref, self.offline)
        return entry


def no_copy_yet(ref: str, offline: bool = False) -> LookupError:
    """The answer for a download reference the catalog has no copy of (`ref` as written).
    Under --offline, which refuses --pull, it says what works there instead."""
    if offline:
        return LookupError(f"{ref!r} has no copy in the catalog yet, and --offline downloads "
                           f"nothing; pull it once online (`mergekit-sd pull {ref}`)")
    return LookupError(f"{ref!r} has no copy in the catalog yet; run `mergekit-sd pull {ref}`, "
                       "or pass --pull")
