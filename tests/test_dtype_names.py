"""Every --dtype (and a recipe's output.dtype) reads its names alike: the short names, torch's
float32/float16/bfloat16 in any case, and one sentence listing what that command takes."""

from __future__ import annotations

import sys

import pytest

from mergekit_sd.errors import UserError
from mergekit_sd.io.dtypes import CHECKPOINT_DTYPES, LORA_DTYPES, RENDER_DTYPES, parse_dtype
from mergekit_sd.io.header import read_header
from mergekit_sd.recipe.loader import RecipeError, parse_recipe
from mergekit_sd.testing.checkpoints import write_checkpoint
from mergekit_sd.testing.loras import write_lora


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"base": write_checkpoint(root / "base.safetensors", "sd1", seed=1),
            "tuned": write_checkpoint(root / "tuned.safetensors", "sd1", seed=2),
            "lora": write_lora(root / "lora.safetensors", "kohya-sd1", seed=3)}


@pytest.fixture
def cli(monkeypatch, capsys):
    """(exit code, stderr) of `mergekit-sd ARGS` run in this process."""
    from mergekit_sd.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["mergekit-sd", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        return exited.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(("typed", "accepted", "short"), [
    ("Float16", CHECKPOINT_DTYPES, "fp16"), ("BF16", LORA_DTYPES, "bf16"),
    (" float32 ", RENDER_DTYPES, "fp32"), ("FP8_E5M2", CHECKPOINT_DTYPES, "fp8_e5m2"),
    ("Keep", CHECKPOINT_DTYPES, "keep"), ("AUTO", RENDER_DTYPES, "auto")])
def test_names_and_aliases_in_any_case(typed, accepted, short):
    assert parse_dtype(typed, accepted, "x") == short


def test_a_refusal_is_one_sentence_with_the_choices_and_the_nearest_name():
    with pytest.raises(UserError) as info:
        parse_dtype("flaot16", CHECKPOINT_DTYPES, "convert")
    assert str(info.value) == (
        "--dtype 'flaot16' is not a dtype convert takes; did you mean 'float16'? It takes keep, "
        "fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2 (also float32, float16, bfloat16, in any "
        "case)")
    with pytest.raises(UserError) as info:  # a real dtype this command does not write
        parse_dtype("fp8_e4m3fn", LORA_DTYPES, "lora merge")
    assert str(info.value) == ("--dtype 'fp8_e4m3fn' is not a dtype lora merge takes; it takes "
                               "fp16, bf16 or fp32 (also float32, float16, bfloat16, in any case)")


def test_bake_takes_the_names_convert_takes(cli, models, tmp_path):
    for typed, stored in (("float16", "F16"), ("fp8_e4m3fn", "F8_E4M3")):
        out = tmp_path / f"{typed}.safetensors"
        code, err = cli("bake", models["base"], models["lora"], "-o", out, "--dtype", typed)
        assert code == 0, err
        assert {info.dtype for info in read_header(out).tensors.values()} == {stored}


def test_lora_commands_take_aliases_and_refuse_fp8_in_the_shared_sentence(cli, models,
                                                                          tmp_path):
    out = tmp_path / "extracted.safetensors"
    code, err = cli("lora", "extract", models["tuned"], models["base"], "--rank", "2", "-o", out,
                    "--dtype", "BFloat16")
    assert code == 0, err
    factors = {info.dtype for name, info in read_header(out).tensors.items()
               if not name.endswith(".alpha")}
    assert factors == {"BF16"}
    code, err = cli("lora", "merge", models["lora"], models["lora"], "-o",
                    tmp_path / "merged.safetensors", "--dtype", "fp8_e4m3fn")
    assert code == 2
    assert err == ("error: --dtype 'fp8_e4m3fn' is not a dtype lora merge takes; it takes fp16, "
                   "bf16 or fp32 (also float32, float16, bfloat16, in any case)\n")


def test_render_takes_aliases():
    import torch

    from mergekit_sd.render.pipelines import render_dtype

    assert render_dtype("sd1", "cpu", "Float16") is torch.float16
    with pytest.raises(UserError, match=r"^--dtype 'half' is not a dtype render takes; it "
                                        r"takes auto, fp32, fp16 or bf16 \(also "):
        render_dtype("sd1", "cpu", "half")


RECIPE = """models: {a: a.safetensors, b: b.safetensors}
steps: [{name: mix, method: weighted_sum, inputs: [a, b], params: {alpha: 0.5}}]
output:
  path: out.safetensors
  dtype: DTYPE
"""


def test_a_recipe_dtype_gets_the_same_sentence_not_pydantics():
    with pytest.raises(RecipeError) as info:
        parse_recipe(RECIPE.replace("DTYPE", "half"), "mix.yaml")
    assert str(info.value) == (
        "mix.yaml, line 5, output.dtype: 'half' is not a dtype merge takes; it takes keep, fp32, "
        "fp16, bf16, fp8_e4m3fn or fp8_e5m2 (also float32, float16, bfloat16, in any case)")
    with pytest.raises(RecipeError, match="did you mean 'bf16'"):
        parse_recipe(RECIPE.replace("DTYPE", "bf61"), "mix.yaml")
    loaded = parse_recipe(RECIPE.replace("DTYPE", "BFloat16"), "mix.yaml")
    assert loaded.recipe.output.dtype == "bf16"
