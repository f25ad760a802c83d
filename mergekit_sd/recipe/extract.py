"""`mergekit-sd recipe extract`: the recipe a merged file carries, as a runnable YAML file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mergekit_sd.errors import UserError
from mergekit_sd.io.header import read_header


def extract_recipe(merged: Path, output_path: Path | None = None) -> str:
    header = read_header(merged)
    raw = header.metadata.get("mergekit_sd.recipe")
    if raw is None:
        lineage = " (it has AUTOMATIC1111 merge keys)" if "sd_merge_recipe" in header.metadata \
            else ""
        raise UserError(f"{merged}: carries no mergekit-sd recipe{lineage}; only files written "
                        "by `mergekit-sd merge` can be re-run")
    doc = json.loads(raw)
    vae_sha = doc["output"].pop("vae_sha256", None)
    doc["output"]["path"] = str(output_path or merged.name)
    # the stored JSON is key-sorted for determinism; a person reads the file's own order
    doc = {"version": doc["version"], "models": doc["models"], "steps": doc["steps"],
           "output": doc["output"]}
    comment = (f"# Recipe extracted from {merged.name}; inputs are pinned by SHA256.\n"
               + (f"# The baked VAE had SHA256 {vae_sha}.\n" if vae_sha else ""))
    return comment + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
