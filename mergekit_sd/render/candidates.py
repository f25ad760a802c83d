"""What gets rendered: checkpoint files, catalog references, and recipe outputs.

A recipe given as a candidate contributes one candidate per sweep value; those are merged
straight into the pipeline's memory (`merge.executor.candidate_tensors`), key by key, with the
values the file `mergekit-sd merge` would write, and no file is written.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.header import read_header
from mergekit_sd.recipe.params import candidate_name
from mergekit_sd.recipe.refs import Resolver, recorded_ref
from mergekit_sd.render.layout import CheckpointLayout, checkpoint_layout, layout_of
from mergekit_sd.render.refs import path_exists, resolve_file

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class RenderCandidate:
    label: str  # column title, manifest and PNG `Model:`; unique within a run
    ref: str  # as the user gave it
    layout: CheckpointLayout
    path: Path | None = None  # a file; None for a merge computed in memory
    known_sha256: str | None = None  # from the resolver (a catalog's hash cache)
    recipe: dict | None = None  # recipe file, candidate name, swept values, input files
    plan: object | None = None  # the MergePlan of a recipe candidate
    merged_name: str | None = None
    inputs: dict[str, Path] = field(default_factory=dict)  # recipe input name -> file
    folder: str = ""  # its folder under images/: `slug(label)`, unique case-insensitively

    def tensors(self, device: str) -> Iterator[tuple[str, object]]:
        """A recipe candidate's merged tensors, computed on `device`."""
        from mergekit_sd.merge.executor import candidate_tensors

        return candidate_tensors(self.plan, self.merged_name, device=device)


def _file_candidate(ref: str, path: Path, sha256: str | None) -> RenderCandidate:
    try:
        header = read_header(path)
    except BadModelFile as exc:
        raise UserError(str(exc)) from None
    return RenderCandidate(path.stem, ref, checkpoint_layout(header), path=path,
                           known_sha256=sha256)


def recipe_candidates(path: Path, resolver: Resolver | None,
                      assignments: list[str] | None = None) -> list[RenderCandidate]:
    """One candidate per output of the recipe (a sweep gives several)."""
    from mergekit_sd.merge.plan import apply_overrides, build_plan
    from mergekit_sd.recipe.loader import load_recipe

    # merged in memory only: output.path is never written, so a recipe without output: is
    # fine here (a stand-in beside the recipe takes its place, as merge's --out FILE does)
    loaded = load_recipe(path, path.with_suffix(".safetensors"))
    apply_overrides(loaded, assignments or [])
    plan = build_plan(loaded, resolver=resolver, existing="unwritten")
    first = plan.inputs[plan.model_order[0]]
    shapes = {task.key: task.out.shape for task in plan.tasks}
    final = loaded.recipe.final_step.name
    fixed = _set_values(loaded)
    folder = os.path.dirname(os.path.abspath(path))
    found = []
    for cand in plan.candidates:
        layout = layout_of(f"{path.name}: {cand.name}", first.found, shapes)
        # what differs from the file: --set values, then the sweep's; the label says them as
        # a sweep's name does, and the manifest keeps them with the --set arguments, so that
        # the recipe file and the manifest together give this candidate's weights again
        values = (*((step, param, label) for step, param, label, _ in fixed), *cand.choice)
        name = candidate_name(final, values)
        recipe = {"path": os.path.abspath(path),
                  # the final step and every value that differs from the file, --set and
                  # swept alike: the label, before a repeated one gets `-2`
                  "candidate": name,
                  "values": {**{f"{step}.{param}": value for step, param, _, value in fixed},
                             **{f"{step}.{param}": value for step, param, value in cand.choice}},
                  "set": list(assignments or []),
                  # as a merge records them (`recorded_ref`), with the recipe's own folder as
                  # the base: what the recipe names, readable from any working folder
                  "inputs_relative_to": folder,
                  "inputs": {n: recorded_ref(p.ref, p.path, Path(folder))
                             for n, p in plan.inputs.items()}}
        found.append(RenderCandidate(name, str(path), layout,
                                     recipe=recipe, plan=plan, merged_name=cand.name,
                                     inputs={n: p.path for n, p in plan.inputs.items()}))
    return found


def _set_values(loaded) -> list[tuple[str, str, object, object]]:
    """(step, param, as a label shows it, as JSON) of each `--set` that is not a sweep (a
    sweep's values name its candidates already). A mapping shows as typed."""
    from pydantic import BaseModel

    from mergekit_sd.recipe.schema import ParamSpec

    fixed = []
    for (_, index, _, param), assignment in loaded.overrides.items():
        step = loaded.recipe.steps[index]
        value = step.params[param]
        if isinstance(value.default if isinstance(value, ParamSpec) else value, list):
            continue
        if isinstance(value, BaseModel):
            fixed.append((step.name, param, "".join(assignment.partition("=")[2].split()),
                          value.model_dump(mode="json", exclude_defaults=True)))
        else:
            fixed.append((step.name, param, value, value))
    return fixed


def collect_candidates(refs: list[str], resolver: Resolver | None = None,
                       assignments: list[str] | None = None) -> list[RenderCandidate]:
    """Candidates for the command line's references, in order, with unique labels.
    `assignments` (`STEP.PARAM=VALUE`) apply to every recipe among them."""
    if not refs:
        raise UserError("give at least one candidate: a checkpoint file, a catalog name or a "
                        "recipe")
    found: list[RenderCandidate] = []
    for ref in refs:
        path = Path(ref).expanduser()
        if path.suffix in RECIPE_SUFFIXES and path_exists(path, "candidate", ref) \
                and path.is_file():
            found.extend(recipe_candidates(path, resolver, assignments))
            continue
        resolved = resolve_file(ref, resolver, "candidate")
        found.append(_file_candidate(ref, resolved.path, resolved.sha256))
    if assignments and all(c.recipe is None for c in found):  # else it would change nothing
        raise UserError(f"--set {assignments[0]!r}: --set changes a recipe's parameters, and "
                        "none of the candidates is a recipe")
    _unique_labels(found)
    return found


def _unique_labels(candidates: list[RenderCandidate]) -> None:
    """Labels say which candidate is which, so only a label given twice (one file name in two
    folders) gets `-2`, `-3` ... added until it is free, whatever other candidates happen to
    be called (`sd1-2` may be a real file). Image folders are made unique apart: labels that
    differ only once slugged or case-folded (`a b` and `a_b`, `Mix` and `mix`: one folder on
    a case-insensitive file system) keep their names, and the folder of the later one gets
    the number. The number survives however long the name is: `slug` keeps a long name's
    end."""
    labels: set[str] = set()
    folders: set[str] = set()
    for cand in candidates:
        label, number = cand.label, 1
        while label in labels:
            number += 1
            label = f"{cand.label}-{number}"
        cand.label = label
        labels.add(label)
        folder, number = slug(label), 1
        while folder.casefold() in folders:
            number += 1
            folder = slug(label, f"-{number}")
        cand.folder = folder
        folders.add(folder.casefold())


# A folder name this long or shorter is kept whole; a longer one keeps its start and its end.
MAX_SLUG = 120
_SLUG_TAIL = 40
FALLBACK_SLUG = "candidate"  # for a label with nothing a file name keeps (`名前`)


def slug(text: str, suffix: str = "") -> str:
    """A file-name-safe version of a label (`mix@alpha=0.3` stays readable), with `suffix`
    (`-2`) added. Accents are dropped from their letters (`ü` -> `u`); a label with nothing
    left gives `candidate`. Never starts with `-` or `.` (`rm -2/...` would read an option,
    `.x` is hidden). A long one is cut in the middle, not at the end: names of merges and
    sweeps differ in their ends (`-v2`, `alpha0.75`), and `_unique_labels` relies on the
    suffix surviving the cut."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text)
                    if not unicodedata.combining(c))
    cleaned = re.sub(r"[^A-Za-z0-9@=._+-]+", "_", plain).lstrip("._-").rstrip("._")
    cleaned = (cleaned or FALLBACK_SLUG) + suffix
    if len(cleaned) > MAX_SLUG:
        cleaned = cleaned[:MAX_SLUG - _SLUG_TAIL - 1] + "~" + cleaned[-_SLUG_TAIL:]
    return cleaned
