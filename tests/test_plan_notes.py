"""What `plan` says about a recipe beyond its keys: `--set` values, steps and models unused."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

from mergekit_sd.errors import UserError
from mergekit_sd.merge.plan import apply_overrides, build_plan
from mergekit_sd.recipe.loader import parse_recipe
from mergekit_sd.testing import write_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_checkpoint(root / f"{name}.safetensors", "sd1", seed=seed)
            for name, seed in (("a", 1), ("b", 2), ("c", 3))}


def recipe(tmp_path: Path, models: dict[str, Path], steps: str, output: str = "") -> Path:
    lines = "\n".join(f"  {n}: {p}" for n, p in models.items())
    path = tmp_path / "recipe.yaml"
    path.write_text(f"version: 1\nmodels:\n{lines}\nsteps:\n"
                    f"{textwrap.indent(textwrap.dedent(steps), '  ')}output:\n"
                    f"  path: {tmp_path / 'out.safetensors'}\n  dtype: fp32\n{output}")
    return path


def planned(path: Path, *assignments: str):
    loaded = parse_recipe(path.read_text(), path)
    apply_overrides(loaded, list(assignments))
    return build_plan(loaded, existing="note")


BLOCKED = """
    - name: fin
      method: weighted_sum
      inputs: [a, b]
      params:
        alpha: {default: 0.5, blocks: {M00: 0}, components: {vae: 1}, keys: {"*attn2*": 0.7}}
    """


@pytest.mark.parametrize(("value", "defaults"), [("0.25", [0.25]),
                                                 ("[0.25, 0.75]", [0.25, 0.75])])
def test_a_plain_set_value_replaces_only_the_default(tmp_path, models, value, defaults):
    """`--set fin.alpha=0.25` on a parameter with blocks is "same block weights, another base
    alpha", as a sweep in `default` is; it used to drop the blocks, components and keys."""
    plan = planned(recipe(tmp_path, models, BLOCKED), f"fin.alpha={value}")
    assert len(plan.candidates) == len(defaults)
    for cand, default in zip(plan.candidates, defaults, strict=True):
        keyed = plan.steps[0].params[cand.name]["alpha"]
        assert keyed.default == default
        assert keyed.by_block["M00"] == 0 and keyed.by_slot["vae"] == 1
        assert [(w, v) for w, _, v in keyed.by_pattern] == [("*attn2*", 0.7)]


def test_a_set_mapping_replaces_the_whole_parameter(tmp_path, models):
    plan = planned(recipe(tmp_path, models, BLOCKED), "fin.alpha={default: 0.25, blocks: {M00: 1}}")
    keyed = plan.steps[0].params["fin"]["alpha"]
    assert keyed.default == 0.25 and keyed.by_block == {"M00": 1}
    assert not keyed.by_slot and not keyed.by_pattern


UNUSED = """
    - {name: s, method: weighted_sum, inputs: [a, b], params: {alpha: [0.1, 0.5]}}
    - {name: t, method: weighted_sum, inputs: [a, c], params: {alpha: 0.5}}
    """


def test_steps_and_models_the_output_does_not_use_are_noted(tmp_path, models):
    """Someone who lists several steps expecting several outputs, or who mistyped an input,
    learns that only the output step's chain runs."""
    path = recipe(tmp_path, models, UNUSED)
    result = run_cli("plan", path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["notes"][:2] == [
        "step s is not used by the output step t, so it is not run; a recipe writes one step, "
        "output.step (the last by default): name the one to write there, or remove it",
        "model b is taken by no step the output step t needs, so it is not read; give it as an "
        "input of such a step, or remove it from models"]
    shown = run_cli("plan", path)
    assert "note: step s is not used by the output step t" in " ".join(shown.stdout.split())


def test_a_recipe_whose_steps_and_models_are_all_used_has_no_such_note(tmp_path, models):
    path = recipe(tmp_path, models, UNUSED.replace("inputs: [a, c]", "inputs: [s, c]"))
    assert not [n for n in planned(path).notes if "not used" in n or "taken by no" in n]


def test_set_on_a_step_the_output_does_not_use_is_refused(tmp_path, models):
    path = recipe(tmp_path, models, UNUSED)
    with pytest.raises(UserError) as caught:
        planned(path, "s.alpha=2")
    assert str(caught.value) == (
        "--set 's.alpha=2': step 's' is not used by the output step 't', so the value would "
        "change nothing; set a step it uses (t), or name s under output.step in the recipe")
    result = run_cli("merge", path, "--set", "s.alpha=2")
    assert result.returncode == 2 and result.stderr.startswith("error: --set 's.alpha=2': ")


ONE = "- {name: m, method: weighted_sum, inputs: [a, b], params: {alpha: 0.5}}\n"


def test_out_problems_name_the_out_not_the_recipe_s_output_path(tmp_path, models):
    """The recipe's output.path line is not what the user wrote wrong."""
    path = recipe(tmp_path, models, ONE)
    (tmp_path / "folder").mkdir()
    for out, problem in ((tmp_path / "folder", "is a folder; give a file name ending in "
                                               ".safetensors"),
                         (tmp_path / "x.txt", "must end in .safetensors"),
                         (models["a"], "the output a.safetensors of m would overwrite the "
                                       "input a")):
        result = run_cli("plan", path, "--out", out)
        assert result.returncode == 2
        assert result.stderr.strip() == f"error: --out {out}: {problem}"


def test_an_output_path_that_is_a_folder_is_said_at_its_recipe_line(tmp_path, models):
    path = recipe(tmp_path, models, ONE)
    path.write_text(path.read_text().replace(str(tmp_path / "out.safetensors"), str(tmp_path)))
    with pytest.raises(UserError) as caught:
        planned(path)
    assert str(caught.value).endswith(f"output.path: {tmp_path} is a folder; give a file name "
                                      "ending in .safetensors")


@pytest.mark.parametrize(("spec", "field"), [
    ("{default: 0.5, blocks: {IN00: .nan}}", "blocks.IN00"),
    ("{default: 0.5, blocks: {IN00-IN05: 0.1, IN03: .inf}}", "blocks.IN03"),
    ("{default: 0.5, components: {vae: .nan}}", "components.vae"),
    ("{default: 0.5, keys: {'*attn*': .inf}}", "keys.*attn*"),
])
def test_a_value_the_method_refuses_is_said_at_its_block_component_or_key(tmp_path, models,
                                                                            spec, field):
    path = recipe(tmp_path, models, ONE.replace("alpha: 0.5", f"alpha: {spec}"))
    with pytest.raises(UserError) as caught:
        planned(path)
    assert f", steps.0.params.alpha.{field}: parameter 'alpha' of merge method " \
           "'weighted_sum' must be a finite number" in str(caught.value), str(caught.value)


def test_a_shape_clash_lists_the_shapes_in_input_order(tmp_path):
    """With the 9-channel model first, listing shapes sorted read as if it were the 4-channel
    one."""
    inputs = {"a": write_checkpoint(tmp_path / "inpaint.safetensors", "sd1-inpainting", seed=1),
              "b": write_checkpoint(tmp_path / "plain.safetensors", "sd1", seed=2)}
    plan = planned(recipe(tmp_path, inputs, ONE))
    note = next(n for n in plan.notes if n.startswith("model.diffusion_model.input_blocks.0.0."))
    shapes = note.split(": shapes ")[1].split(";")[0]
    assert shapes.endswith(" in a, (16, 4, 3, 3) in b") and ", 9, 3, 3) in a" in shapes, note


THREE = {"a": "a", "b": "b", "c": "c"}


@pytest.mark.parametrize(("params", "note"), [
    ("{seed: 42}", "step t: ties uses seed only with dare: true, which this step does not set, "
                   "so it is ignored; set dare: true or remove it"),
    ("{seed: [1, 2], dare_rate: 0.5, dare: false}",
     "step t: ties uses seed and dare_rate only with dare: true, which this step does not set, "
     "so they are ignored; set dare: true or remove them"),
    ("{seed: 42, dare: true}", None),
    ("{seed: 42, dare: {default: false, blocks: {IN00: true}}}", None),
    ("{density: 0.5}", None),
])
def test_a_ties_seed_or_dare_rate_without_dare_is_noted_as_ignored(tmp_path, models, params,
                                                                   note):
    path = recipe(tmp_path, models, f"- {{name: t, method: ties, inputs: [a, b, c], "
                                    f"params: {params}}}\n")
    said = [n for n in planned(path).notes if n.startswith("step t: ties uses")]
    assert said == ([note] if note else [])


@pytest.mark.parametrize(("written", "recorded", "stored"), [
    ("float16", "fp16", "F16"), ("BFloat16", "bf16", "BF16"), ("fp8_e5m2", "fp8_e5m2", "F8_E5M2")])
def test_output_dtype_takes_the_names_convert_takes(tmp_path, models, written, recorded, stored):
    """`convert --dtype` took fp8_e5m2 and torch's names; a recipe's output.dtype refused them."""
    path = recipe(tmp_path, models, ONE)
    path.write_text(path.read_text().replace("dtype: fp32", f"dtype: {written}"))
    plan = planned(path)
    assert plan.loaded.recipe.output.dtype == recorded  # what the output's recipe records
    assert {t.out.dtype for t in plan.tasks if t.merge} == {stored}


def test_plan_says_its_output_size_counts_the_tensor_data_only(tmp_path, models):
    """The header (key names, metadata, the recipe) comes on top: on the tiny demo models the
    size shown was well under the file's."""
    result = run_cli("plan", recipe(tmp_path, models, ONE))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("output m -> "))
    assert line.endswith(" of tensor data)"), line
