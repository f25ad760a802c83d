"""Model references in recipes: plain paths resolved here, everything else by an injected resolver.

`catalog:NAME`, `#ID`, `sha256:HASH`, `autov3:HASH`, `hf://org/repo/file` and
`civitai://VERSION_ID` need a model library; the engine stays usable without one (DESIGN.md §7),
so the caller passes a resolver. A bare name or number stays a path: a recipe's file names must
not change meaning with what a catalog holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SCHEMES = ("catalog:", "#", "sha256:", "autov3:", "hf://", "civitai://")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    sha256: str | None = None  # known already (a catalog's cache): saves hashing the file


class Resolver(Protocol):
    def __call__(self, ref: str) -> ResolvedModel:
        """Resolve a non-path reference, or raise LookupError with one sentence."""


class NoResolver:
    """What the engine does alone: say which reference needs the catalog and how to get one."""

    def __call__(self, ref: str) -> ResolvedModel:
        raise LookupError(f"{ref!r} needs the model catalog to resolve; run through "
                          "`mergekit-sd merge` (which uses the catalog) or give a file path")


def is_path_ref(ref: str) -> bool:
    return not ref.startswith(SCHEMES)


def recorded_ref(ref: str, path: Path, output_folder: Path) -> str:
    """`ref` (resolved to `path`) as a file made from it records it, for `recipe extract` to
    find again: a relative path is made relative to the output file's own folder; absolute
    paths and references that are no path (`sha256:`, `catalog:` ...) stay as given. Merges and
    bakes record their inputs alike. The folder the command ran in, or the recipe's, is
    recorded nowhere (and recording it would make the bytes depend on where that was).
    A file whose name reads as a reference (`#1.safetensors`, given as a path to `bake`) is
    recorded as a path all the same, `./` in front where nothing else tells them apart."""
    if Path(ref).expanduser().is_absolute() or (not is_path_ref(ref) and not _names(ref, path)):
        return ref
    relative = Path(os.path.relpath(path, output_folder)).as_posix()
    return relative if is_path_ref(relative) else f"./{relative}"


def _names(ref: str, path: Path) -> bool:
    """Whether `ref`, read as a path from the working folder, is the file `path`."""
    try:
        return Path(ref).expanduser().resolve() == Path(path).resolve()
    except OSError:
        return False


def resolve_path(ref: str, base_dir: Path) -> Path:
    """A path reference, relative to the recipe's folder when not absolute; `~` expanded."""
    path = Path(ref).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))
