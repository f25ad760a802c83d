"""`recipe extract`: the recipe a merged file carries runs from any folder and gives the same
bytes; a file whose stored recipe is damaged gets one sentence."""

from __future__ import annotations

import pytest
from conftest import run_cli

from mergekit_sd.testing import write_checkpoint

RECIPE = """version: 1
models:
  a: ../../models/a.safetensors
  b: {ref: ../../models/b.safetensors}
steps:
  - name: mix
    method: weighted_sum
    inputs: [a, b]
    params: {alpha: 0.3}
output:
  path: ../../out/mix.safetensors
  vae: ../../models/vae.safetensors
  dtype: fp32
  date: "2026-11-21"
"""


@pytest.mark.parametrize(("written_to", "output_path"), [
    ("again.yaml", "../out/again.safetensors"),
    ("deeper/again.yaml", "../../out/again.safetensors")])
def test_an_extracted_recipe_run_from_another_folder_gives_the_same_bytes(tmp_path, written_to,
                                                                          output_path):
    for name, variant, seed in (("a", "sd1", 1), ("b", "sd1", 2), ("vae", "vae-sd", 9)):
        write_checkpoint(tmp_path / "models" / f"{name}.safetensors", variant, seed=seed)
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    (tmp_path / "recipes" / "sub" / "mix.yaml").write_text(RECIPE)
    merged = run_cli("merge", tmp_path / "recipes" / "sub" / "mix.yaml")
    assert merged.returncode == 0, merged.stderr
    (tmp_path / "elsewhere").mkdir()
    extracted = run_cli("recipe", "extract", tmp_path / "out" / "mix.safetensors",
                        "-o", written_to, "--output-path", output_path,
                        cwd=tmp_path / "elsewhere")
    assert extracted.returncode == 0, extracted.stderr
    # output.path, as given, is relative to the recipe's folder like every other path
    rerun = run_cli("merge", tmp_path / "elsewhere" / written_to, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert ((tmp_path / "out" / "again.safetensors").read_bytes()
            == (tmp_path / "out" / "mix.safetensors").read_bytes())


@pytest.mark.parametrize("stored", [
    "{bad json", "[1, 2]", '{"output": 1}', "[" * 50000 + "]" * 50000,
    '{"version": 1, "models": {}, "steps": [], "output": {}}'])
def test_damaged_recipe_metadata_is_one_sentence(tmp_path, stored):
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", metadata={
        "mergekit_sd.recipe": stored})
    result = run_cli("recipe", "extract", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: {path}: its mergekit-sd recipe metadata (mergekit_sd.recipe) is damaged, so "
        "no recipe can be extracted from it")


def test_extract_refuses_an_existing_file_and_never_replaces_the_merged_file(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / "models" / f"{name}.safetensors", "sd1", seed=seed)
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    (tmp_path / "recipes" / "sub" / "mix.yaml").write_text(
        RECIPE.replace("  vae: ../../models/vae.safetensors\n", ""))
    assert run_cli("merge", tmp_path / "recipes" / "sub" / "mix.yaml").returncode == 0
    merged = tmp_path / "out" / "mix.safetensors"
    model = merged.read_bytes()
    other = tmp_path / "models" / "a.safetensors"
    other_bytes = other.read_bytes()
    for target in (merged, tmp_path / "out" / ".." / "out" / "mix.safetensors"):
        for extra in ((), ("--overwrite",)):
            result = run_cli("recipe", "extract", merged, "-o", target, *extra)
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip() == (f"error: -o {target} is the merged file being "
                                             "read; give the recipe its own name, e.g. -o "
                                             "recipe.yaml")
    result = run_cli("recipe", "extract", merged, "-o", other)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: {other}: already exists; pass --overwrite to "
                                     "replace it")
    assert merged.read_bytes() == model and other.read_bytes() == other_bytes
    again = tmp_path / "again.yaml"
    again.write_text("old")
    assert run_cli("recipe", "extract", merged, "-o", again, "--overwrite").returncode == 0
    assert "weighted_sum" in again.read_text()
