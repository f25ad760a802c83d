"""`mergekit-sd recipe extract`: the recipe a merged file carries, as a runnable YAML file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mergekit_sd.errors import UserError
from mergekit_sd.io.header import read_header
from mergekit_sd.recipe.refs import is_path_ref
from mergekit_sd.recipe.schema import Recipe


def extract_recipe(merged: Path, output_path: Path | None = None,
                   recipe_folder: Path | None = None) -> str:
    """The recipe stored in `merged`, for a file in `recipe_folder` (default: the current
    folder): relative paths, recorded relative to the merged file's folder, are rebased onto
    it. output.path is `output_path` as given, or the merged file itself, so that re-running
    the recipe gives the same bytes."""
    header = read_header(merged)
    raw = header.metadata.get("mergekit_sd.recipe")
    if raw is None:
        lineage = " (it has AUTOMATIC1111 merge keys)" if "sd_merge_recipe" in header.metadata \
            else ""
        raise UserError(f"{merged}: carries no mergekit-sd recipe{lineage}; only files written "
                        "by `mergekit-sd merge` can be re-run")
    doc = _stored_recipe(merged, raw)
    folder = Path.cwd() if recipe_folder is None else recipe_folder
    for name, model in doc["models"].items():
        if isinstance(model, dict):
            model["ref"] = _rebased(model["ref"], merged.parent, folder)
        else:
            doc["models"][name] = _rebased(model, merged.parent, folder)
    if doc["output"].get("vae"):
        doc["output"]["vae"] = _rebased(doc["output"]["vae"], merged.parent, folder)
    doc["output"]["path"] = (str(output_path) if output_path is not None
                             else _relative(merged, folder))
    comment = f"# Recipe extracted from {merged.name}; inputs are pinned by SHA256.\n"
    return comment + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _stored_recipe(merged: Path, raw: str) -> dict:
    """The stored recipe in the file's own order (the baked VAE pinned by output.vae_sha256,
    as the inputs are by their sha256); one sentence when the value is not a recipe (edited or
    damaged metadata)."""
    try:
        stored = json.loads(raw)
        # the stored JSON is key-sorted for determinism; a person reads the file's own order
        doc = {"version": stored["version"], "models": stored["models"],
               "steps": stored["steps"], "output": {**stored["output"], "path": merged.name}}
        Recipe.model_validate(doc)
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
        raise UserError(f"{merged}: its mergekit-sd recipe metadata (mergekit_sd.recipe) is "
                        "damaged, so no recipe can be extracted from it") from None
    return doc


def _rebased(ref: str, old_folder: Path, new_folder: Path) -> str:
    """A relative path ref that resolved from `old_folder`, made to resolve from `new_folder`."""
    if not is_path_ref(ref) or Path(ref).expanduser().is_absolute():
        return ref
    return _relative(Path(os.path.normpath(old_folder / ref)), new_folder)


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix()
