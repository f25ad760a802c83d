"""Recipe files that load wrongly get one sentence naming the file, the line and the field."""

from __future__ import annotations

import pytest

from mergekit_sd.recipe.loader import RecipeError, parse_recipe

STEPS = "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"


def problem_of(text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, "r.yaml")
    return str(caught.value)


def test_an_unknown_field_of_a_model_in_its_long_form_is_named():
    message = problem_of("version: 1\nmodels: {a: {ref: a.safetensors, sah256: abc}, "
                         f"b: b.safetensors}}\n{STEPS}output: {{path: o.safetensors}}\n")
    assert message == ("r.yaml, line 2, models.a.sah256: is not a field here (did you mean "
                       "'sha256'? valid fields: ref, sha256)")


def test_an_unquoted_date_is_asked_in_quotes():
    message = problem_of("version: 1\nmodels: {a: a.safetensors, b: b.safetensors}\n"
                         f"{STEPS}output: {{path: o.safetensors, date: 2026-11-21}}\n")
    assert message == ("r.yaml, line 4, output.date: YAML reads 2026-11-21 as a date, not "
                       "text; put it in quotes: '2026-11-21'")
