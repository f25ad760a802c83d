"""The inputs' metadata facts a merge keeps: what kind of model it is, where every input agrees.

A merge of two v-prediction models is a v-prediction model, but only the metadata says so (the
weights cannot); dropping `modelspec.prediction_type` made programs sample it as epsilon, which
gives garbage. Who made an input, its title, date or hash describe that file, not the merge.
"""

from __future__ import annotations

from collections.abc import Iterable

# SAI modelspec fields that say how the model is to be run
CARRIED_KEYS = (
    "modelspec.prediction_type",
    "modelspec.implementation",
    "modelspec.resolution",
    "modelspec.timestep_range",
    "modelspec.encoder_layer",
)


def agreed_facts(inputs: Iterable[tuple[str, dict[str, str]]]
                 ) -> tuple[dict[str, str], list[str]]:
    """(the CARRIED_KEYS every input gives with one value, a note for each key the inputs give
    differently or only some give), from (input name, its metadata) pairs."""
    inputs = list(inputs)
    carried, notes = {}, []
    for key in CARRIED_KEYS:
        values = {name: metadata.get(key) for name, metadata in inputs}
        if all(v is None for v in values.values()):
            continue
        if len(set(values.values())) == 1:
            carried[key] = next(iter(values.values()))
            continue
        said = ", ".join(f"{name}: {'not set' if v is None else v}" for name, v in values.items())
        note = f"the inputs disagree on {key} ({said}), so the output does not carry it"
        if key == "modelspec.prediction_type" and len(set(values.values()) - {None}) > 1:
            note += ("; a merge of models that predict different things (epsilon, v) rarely "
                     "samples well as either")
        notes.append(note)
    return carried, notes
