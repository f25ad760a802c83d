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


@pytest.mark.parametrize("pin", ["f4be143a0045", "'" + "g" * 64 + "'", "'" + "a" * 65 + "'"])
def test_a_sha256_pin_must_be_64_hex_digits(pin):
    message = problem_of(f"version: 1\nmodels:\n  a: {{ref: a.safetensors, sha256: {pin}}}\n"
                         f"  b: b.safetensors\n{STEPS}output: {{path: o.safetensors}}\n")
    assert message.startswith("r.yaml, line 3, models.a.sha256: give all 64 hex digits of "
                              "the file's SHA256"), message


def test_a_whole_sha256_pin_in_either_case_loads():
    pin = "F4BE143A0045" + "0" * 52
    loaded = parse_recipe(f"version: 1\nmodels: {{a: {{ref: a.safetensors, sha256: {pin}}}, "
                          f"b: b.safetensors}}\n{STEPS}output: {{path: o.safetensors}}\n")
    assert loaded.recipe.model_ref("a").sha256 == pin


@pytest.mark.parametrize(("lora", "field"), [("strength: .nan", "strength"),
                                             ("strength: .inf", "strength"),
                                             ("te_strength: -.inf", "te_strength"),
                                             ("blocks: [1, .nan]", "blocks.1")])
def test_lora_strengths_in_a_recipe_must_be_finite(lora, field):
    message = problem_of("version: 1\nmodels: {a: a.safetensors, l: l.safetensors}\n"
                         f"steps: [{{name: baked, method: bake_lora, inputs: [a], "
                         f"loras: [{{model: l, {lora}}}]}}]\noutput: {{path: o.safetensors}}\n")
    assert message.startswith(f"r.yaml, line 3, steps.0.loras.0.{field}: "), message
    assert "finite number" in message, message


def test_a_recipe_nested_too_deeply_is_not_valid_yaml():
    message = problem_of("version: 1\nmodels: " + "[" * 3000 + "]" * 3000 + "\n")
    assert message == ("r.yaml: is not valid YAML (its collections are nested too deeply to "
                       "read)")


@pytest.mark.parametrize(("models", "output", "field"), [
    ("{a: 'https://h.test/m?token=SECRET', b: b.safetensors}", "{path: o.safetensors}",
     "line 2, models.a"),
    ("{a: {ref: 'HTTP://h.test/m?token=SECRET'}, b: b.safetensors}", "{path: o.safetensors}",
     "line 2, models.a.ref"),
    ("{a: a.safetensors, b: b.safetensors}",
     "{path: o.safetensors, vae: 'https://h.test/v?token=SECRET'}", "line 4, output.vae")])
def test_a_download_link_is_no_model_reference_and_its_token_is_not_repeated(models, output,
                                                                             field):
    message = problem_of(f"version: 1\nmodels: {models}\n{STEPS}output: {output}\n")
    assert message.startswith(f"r.yaml, {field}: a download link is not a model reference; "
                              "fetch it with `mergekit-sd pull URL`"), message
    assert "SECRET" not in message


def test_an_alias_inside_its_own_anchor_is_one_sentence():
    message = problem_of(f"version: 1\nmodels: &m {{a: *m}}\n{STEPS}output: {{path: o.yaml}}\n")
    assert message.startswith("r.yaml, line 2, models.a"), message


def test_aliases_of_aliases_are_read_without_walking_every_repetition():
    # nine copies of nine copies ... eleven deep: walking every use would never finish
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    lines += ["models: {a: a.safetensors, b: *a11}", STEPS.strip(), "output: {path: o.yaml}"]
    assert problem_of("\n".join(lines) + "\n").startswith("r.yaml, line 14, models.b: ")


def test_a_block_map_value_that_is_no_number_is_named_by_its_own_field():
    message = problem_of("version: 1\nmodels: {a: a.safetensors, l: l.safetensors}\n"
                         "steps: [{name: b, method: bake_lora, inputs: [a], "
                         "loras: [{model: l, blocks: {'IN*': abc}}]}]\n"
                         "output: {path: o.safetensors}\n")
    assert message == ("r.yaml, line 3, steps.0.loras.0.blocks.IN*: 'abc' is not a finite "
                       "number; give each block a number, such as 0.5"), message


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 1\nmodels:\n  a: a.safetensors\n  b: b.safetensors\nsteps:\n- name: mix\n"
     "  method: weighted_sum\n  inputs: [a, b]\n  params:\n    alpha: 0.2\n    alpha: 0.8\n"
     "output: {path: o.safetensors}\n",
     "r.yaml, line 11, steps.0.params.alpha: is given twice (first on line 10)"),
    ("version: 1\nmodels:\n  a: a.safetensors\n  a: c.safetensors\n  b: b.safetensors\n"
     f"{STEPS}output: {{path: o.safetensors}}\n",
     "r.yaml, line 4, models.a: is given twice (first on line 3)"),
    ("version: 1\nversion: 1\n", "r.yaml, line 2, version: is given twice (first on line 1)"),
], ids=["param", "model", "top-level"])
def test_a_key_given_twice_is_one_sentence_naming_both_lines(text, expected):
    # PyYAML keeps the last silently: a model or a value the user wrote would be dropped
    assert problem_of(text) == expected


def test_a_merge_key_may_still_be_overridden():
    loaded = parse_recipe("version: 1\nmodels: {a: a.safetensors, b: b.safetensors}\n"
                          f"{STEPS}output: {{<<: {{path: o.safetensors, dtype: fp16}}, "
                          "dtype: fp32}\n")
    assert loaded.recipe.output.dtype == "fp32"


def test_a_sha256_of_digits_only_yaml_reads_as_a_number_is_asked_in_quotes():
    message = problem_of(f"version: 1\nmodels:\n  a: {{ref: a.safetensors, sha256: {'1' * 64}}}\n"
                         f"  b: b.safetensors\n{STEPS}output: {{path: o.safetensors}}\n")
    assert message == ("r.yaml, line 3, models.a.sha256: YAML reads a SHA256 of digits only as "
                       "a number, not text; put it in quotes: sha256: \"0123…\"")


def test_an_unknown_field_of_a_lora_says_the_nearest_one():
    message = problem_of("version: 1\nmodels: {a: a.safetensors, l: l.safetensors}\n"
                         "steps: [{name: baked, method: bake_lora, inputs: [a], "
                         "loras: [{model: l, strenght: 1}]}]\noutput: {path: o.safetensors}\n")
    assert message == ("r.yaml, line 3, steps.0.loras.0.strenght: is not a field here (did you "
                       "mean 'strength'? valid fields: model, strength, te_strength, blocks)")


@pytest.mark.parametrize(("step", "field", "what"), [
    ("method: weighted_sum, inputs: [a, l], params: {alpha: {blocks: {M00: [0, 1]}}}",
     "params.alpha.blocks.M00", "a block's value; give one value"),
    ("method: weighted_sum, inputs: [a, l], params: {alpha: {components: {vae: [0, 1]}}}",
     "params.alpha.components.vae", "a component's value; give one value"),
    ("method: weighted_sum, inputs: [a, l], params: {alpha: [[0.1, 0.2], 0.3]}",
     "params.alpha.0", "a value inside a sweep; give one value"),
    ("method: bake_lora, inputs: [a], loras: [{model: l, strength: [0.5, 1]}]",
     "loras.0.strength", "a LoRA's strength; give one value"),
    ("method: bake_lora, inputs: [a], loras: [{model: l, blocks: {IN00: [0.5, 1]}}]",
     "loras.0.blocks.IN00", "a block's value; give each block one number"),
])
def test_a_sweep_where_none_is_possible_says_where_one_is(step, field, what):
    """pydantic's "Input should be a valid number" said nothing of why a list is wrong here."""
    message = problem_of("version: 1\nmodels: {a: a.safetensors, l: l.safetensors}\n"
                         f"steps: [{{name: s, {step}}}]\noutput: {{path: o.safetensors}}\n")
    assert message == (f"r.yaml, line 3, steps.0.{field}: a sweep (a list of values) is only "
                       f"possible on a parameter or its default, not on {what}")
