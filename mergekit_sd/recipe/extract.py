"""`mergekit-sd recipe extract`: the recipe a merged file carries, as a runnable YAML file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mergekit_sd.convert import META_DTYPE, recipe_output_name
from mergekit_sd.errors import UserError
from mergekit_sd.io.hashing import file_sha256
from mergekit_sd.io.header import read_header
from mergekit_sd.io.writer import same_file
from mergekit_sd.recipe.refs import is_path_ref, resolve_path
from mergekit_sd.recipe.schema import Recipe


@dataclass
class Extracted:
    text: str  # the recipe, YAML with comments
    notes: list[str] = field(default_factory=list)  # one line each, for the user


# what our LoRA commands record instead of a recipe (a LoRA is no recipe's output)
_NO_RECIPE_MAKERS = {"mergekit_sd.merged_loras": "a LoRA written by `mergekit-sd lora merge`",
                     "mergekit_sd.extracted_from": "a LoRA written by `mergekit-sd lora extract`"}


def extract_recipe(merged: Path, output_path: Path | None = None,
                   recipe_folder: Path | None = None,
                   sha256_of: Callable[[Path], str] = file_sha256) -> Extracted:
    """The recipe stored in `merged`, for a file in `recipe_folder` (default: the current
    folder): relative paths, recorded relative to the merged file's folder, are rebased onto
    it. An input that is no longer there (the merged file, or the input, was moved) is named
    by its SHA256 instead, which the catalog resolves, with the recorded path in a comment.
    output.path is `output_path` as given, or the merged file itself, so that re-running the
    recipe gives the same bytes; for a conversion of a merged file, the merged file's own name
    beside it (never the conversion: the recipe cannot make its bytes)."""
    header = read_header(merged)
    raw = header.metadata.get("mergekit_sd.recipe")
    if raw is None:
        made = next((what for key, what in _NO_RECIPE_MAKERS.items() if key in header.metadata),
                    None)
        if made:
            raise UserError(f"{merged}: {made}, which records its inputs (`catalog lineage` "
                            "shows them) but no recipe; only files written by `mergekit-sd "
                            "merge` or `mergekit-sd bake` can be re-run")
        lineage = " (it has AUTOMATIC1111 merge keys)" if "sd_merge_recipe" in header.metadata \
            else ""
        raise UserError(f"{merged}: carries no mergekit-sd recipe{lineage}; only files written "
                        "by `mergekit-sd merge` or `mergekit-sd bake` can be re-run")
    doc = _stored_recipe(merged, raw)
    folder = Path.cwd() if recipe_folder is None else recipe_folder
    conversion = _Conversion.of(merged, header.metadata, doc)
    made = merged if conversion is None else conversion.original
    doc["output"]["path"] = (str(output_path) if output_path is not None
                             else _relative(made, folder))
    comment = f"# Recipe extracted from {merged.name}; inputs are pinned by SHA256.\n"
    notes = []
    if conversion is not None:  # said before any input is hashed
        written = resolve_path(doc["output"]["path"], folder)
        conversion.refuse_replacing(written)
        comment = f"# {conversion.sentence()}\n{comment}"
        notes.append(f"{conversion.sentence()}; it writes {written}")
    refs = _Refs(merged, folder, sha256_of, conversion is not None)
    for name, model in doc["models"].items():
        if isinstance(model, dict):
            model["ref"] = refs.found(name, model["ref"], model.get("sha256"))
        else:
            doc["models"][name] = refs.found(name, model, None)
    if doc["output"].get("vae"):
        doc["output"]["vae"] = refs.found("output.vae", doc["output"]["vae"],
                                          doc["output"].get("vae_sha256"))
    text = refs.commented(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return Extracted(comment + text, notes + refs.notes())


@dataclass
class _Conversion:
    """`merged` is a conversion (convert --dtype) of the file its recipe makes: the recipe
    remakes that file, which has other bytes, never the conversion."""

    merged: Path
    original: Path  # the file the recipe makes, beside the conversion
    converted_to: str | None  # the conversion's dtype
    recipe_dtype: str

    @classmethod
    def of(cls, merged: Path, metadata: dict[str, str], doc: dict) -> _Conversion | None:
        made = recipe_output_name(metadata)
        if made is None:
            return None
        return cls(merged, merged.parent / Path(made).name, metadata.get(META_DTYPE),
                   doc["output"].get("dtype", "fp16"))

    def sentence(self, subject: bool = True) -> str:
        """"M is a bf16 conversion of O: the recipe remakes O as merged (fp16), not M"."""
        dtype = self.converted_to if self.converted_to not in (None, "keep") else None
        what = f"{'an' if dtype and dtype[0] in 'f' else 'a'} {dtype} conversion" if dtype \
            else "a conversion"
        name, original = self.merged.name, self.original.name
        if original == name:
            text = (f"is {what} of another {original}: the recipe remakes that file as "
                    f"merged ({self.recipe_dtype}), not this one")
        else:
            text = (f"is {what} of {original}: the recipe remakes {original} as merged "
                    f"({self.recipe_dtype}), not {name}")
        return f"{name} {text}" if subject else text

    def refuse_replacing(self, written: Path) -> None:
        if same_file(written, self.merged):
            raise UserError(f"{self.merged}: {self.sentence(subject=False)}, and its output "
                            "here would replace this file with other bytes; give the recipe "
                            "another output with --output-path")


class _Refs:
    """Where a merged file's recorded inputs are now, as references for the recipe's folder."""

    def __init__(self, merged: Path, folder: Path, sha256_of: Callable[[Path], str],
                 converted: bool):
        self.merged, self.folder, self.sha256_of = merged, folder, sha256_of
        self.why = ("was it converted or moved into another folder?" if converted
                    else "was it moved since the merge?")
        self.by_hash: list[str] = []  # inputs named by SHA256: not at their recorded path
        self.lost: list[str] = []  # not there, and no SHA256 to find them by
        self.stand_ins: dict[str, str] = {}  # written in the YAML -> the text that replaces it

    def found(self, name: str, ref: str, sha256: str | None) -> str:
        """`ref` for the recipe's folder: the recorded path when the file there is the one
        merged, else `sha256:HASH` (with the recorded path in a comment)."""
        if not is_path_ref(ref):
            return ref
        rebased = _rebased(ref, self.merged.parent, self.folder)
        why = self._mismatch(resolve_path(ref, self.merged.parent), sha256)
        if why is None:
            return rebased
        if sha256 is None:
            self.lost.append(name)
            return rebased
        self.by_hash.append(name)
        stand_in = f"mergekit-sd-stand-in-{len(self.stand_ins)}-{sha256[:16]}"
        comment = f"{self.merged.name} recorded {ref}, relative to its folder: {why}"
        self.stand_ins[stand_in] = f"sha256:{sha256.lower()}  # {' '.join(comment.split())}"
        return stand_in

    def _mismatch(self, path: Path, sha256: str | None) -> str | None:
        """Why `path` is not the input recorded with `sha256`; None when it is."""
        if not path.is_file():
            return "no such file beside it now"
        if sha256 is None:
            return None
        try:
            same = self.sha256_of(path) == sha256.lower()
        except OSError:
            return "that file cannot be read now"
        return None if same else "the file there now has another SHA256"

    def commented(self, text: str) -> str:
        for stand_in, value in self.stand_ins.items():
            text = text.replace(stand_in, value, 1)
        return text

    def notes(self) -> list[str]:
        notes = []
        if self.by_hash:
            notes.append(f"{_inputs(self.by_hash, self.merged)} not at the path it recorded "
                         f"({self.why}), so the recipe names "
                         f"{_them(self.by_hash)} by SHA256, which `merge` finds through the "
                         "catalog (`mergekit-sd catalog scan --hash` a folder that holds "
                         f"{_them(self.by_hash)})")
        if self.lost:
            notes.append(f"{_inputs(self.lost, self.merged)} not at the path it recorded, and "
                         f"it recorded no SHA256 to find {_them(self.lost)} by; fix the path in "
                         "the recipe")
        return notes


def _inputs(names: list[str], merged: Path) -> str:
    """"input a of M is" / "inputs a and b of M are"."""
    if len(names) == 1:
        return f"input {names[0]} of {merged.name} is"
    return f"inputs {', '.join(names[:-1])} and {names[-1]} of {merged.name} are"


def _them(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"


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
