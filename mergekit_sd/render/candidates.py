"""What gets rendered: checkpoint files, catalog references, and recipe outputs.

A recipe given as a candidate contributes one candidate per sweep value; those are merged
straight into the pipeline's memory (`merge.executor.candidate_tensors`), key by key, with the
values the file `mergekit-sd merge` would write, and no file is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.header import read_header
from mergekit_sd.recipe.params import candidate_name
from mergekit_sd.recipe.refs import Resolver
from mergekit_sd.render.layout import CheckpointLayout, checkpoint_layout, layout_of
from mergekit_sd.render.refs import path_exists, resolve_file

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class RenderCandidate:
    label: str  # column title and folder name; unique within a run
    ref: str  # as the user gave it
    layout: CheckpointLayout
    path: Path | None = None  # a file; None for a merge computed in memory
    known_sha256: str | None = None  # from the resolver (a catalog's hash cache)
    recipe: dict | None = None  # recipe file, candidate name, swept values, input files
    plan: object | None = None  # the MergePlan of a recipe candidate
    merged_name: str | None = None
    inputs: dict[str, Path] = field(default_factory=dict)  # recipe input name -> file

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
    found = []
    for cand in plan.candidates:
        layout = layout_of(f"{path.name}: {cand.name}", first.found, shapes)
        # what differs from the file: --set values, then the sweep's; the label says them as
        # a sweep's name does, and the manifest keeps them with the --set arguments, so that
        # the recipe file and the manifest together give this candidate's weights again
        values = (*((step, param, label) for step, param, label, _ in fixed), *cand.choice)
        recipe = {"path": os.path.abspath(path), "candidate": cand.name,
                  "values": {**{f"{step}.{param}": value for step, param, _, value in fixed},
                             **{f"{step}.{param}": value for step, param, value in cand.choice}},
                  "set": list(assignments or []),
                  "inputs": {name: str(p.path) for name, p in plan.inputs.items()}}
        found.append(RenderCandidate(candidate_name(final, values), str(path), layout,
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
    """Labels name image folders, so they are made unique as folder names: after slugging and
    case-folding (for case-insensitive file systems), with `-2`, `-3` ... added until the name
    is free, whatever other candidates happen to be called (`sd1-2` may be a real file). The
    number survives however long the label is: `slug` keeps a long name's end."""
    taken: set[str] = set()
    for cand in candidates:
        base, label, number = cand.label, cand.label, 1
        while _folder_key(label) in taken:
            number += 1
            label = f"{base}-{number}"
        cand.label = label
        taken.add(_folder_key(label))


def _folder_key(label: str) -> str:
    return slug(label).casefold()


# A folder name this long or shorter is kept whole; a longer one keeps its start and its end.
MAX_SLUG = 120
_SLUG_TAIL = 40


def slug(text: str) -> str:
    """A file-name-safe version of a label (`mix@alpha=0.3` stays readable). A long one is cut
    in the middle, not at the end: names of merges and sweeps differ in their ends (`-v2`,
    `alpha0.75`), and `_unique_labels` relies on a `-2` it adds surviving the cut."""
    cleaned = re.sub(r"[^A-Za-z0-9@=._+-]+", "_", text).strip("._")
    if len(cleaned) > MAX_SLUG:
        cleaned = cleaned[:MAX_SLUG - _SLUG_TAIL - 1] + "~" + cleaned[-_SLUG_TAIL:]
    return cleaned or "candidate"
