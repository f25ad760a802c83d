"""Every example recipe in recipes/ runs on tiny models in the real layouts it names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from mergekit_sd.recipe.loader import load_recipe
from mergekit_sd.testing import write_checkpoint
from mergekit_sd.testing.loras import write_lora
from mergekit_sd.testing.workspace import make_demo_workspace

RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name != "demo.yaml")


def variant_for(file_name: str) -> str:
    """The tiny model an example's file name stands for."""
    for prefix, variant in (("sd15", "sd1"), ("sdxl", "sdxl"), ("flux-dev", "flux-dev"),
                            ("vae", "vae-sd")):
        if file_name.startswith(prefix):
            return variant
    raise AssertionError(f"no tiny model for {file_name}")


def test_there_are_at_least_five_examples():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("source", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_runs(tmp_path, source):
    path = tmp_path / source.name
    shutil.copy(source, path)
    recipe = load_recipe(path).recipe
    refs = [recipe.model_ref(n).ref for n in recipe.models]
    refs += [recipe.output.vae] if recipe.output.vae else []
    for seed, ref in enumerate(refs):
        if Path(ref).parent.name == "loras":  # loras/FORMAT-NAME.safetensors
            write_lora(tmp_path / ref, Path(ref).stem.rsplit("-", 1)[0], seed=seed)
        else:
            write_checkpoint(tmp_path / ref, variant_for(Path(ref).name), seed=seed)
    assert run_cli("plan", path).returncode == 0
    result = run_cli("merge", path)
    assert result.returncode == 0, result.stderr
    # an example sets nothing that does nothing (ties-three set a seed without dare: true)
    idle = [line for line in result.stderr.splitlines()
            if line.startswith("note: ") and ("ignored" in line or "not used by" in line
                                              or "taken by no step" in line)]
    assert not idle, idle
    written = [line.split(" -> ")[1] for line in result.stdout.splitlines() if " -> " in line]
    assert written and all((tmp_path / w).exists() or Path(w).exists() for w in written)
    inspected = run_cli("inspect", *(tmp_path / w for w in written))
    assert inspected.returncode == 0, inspected.stderr


def test_the_recipe_commands_the_readme_shows_run_after_make_demo(tmp_path):
    """The README's `plan`/`merge recipes/X.yaml` lines must work in the workspace `make demo`
    leaves (the other examples' models are not shipped)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = sorted(set(re.findall(r"mergekit-sd (?:plan|merge) (recipes/[\w.-]+\.yaml)", readme)))
    assert shown, "the README shows no recipe command"
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    make_demo_workspace(tmp_path / "demo-workspace")
    for recipe in shown:
        result = run_cli("plan", recipe, cwd=tmp_path)
        assert result.returncode == 0, f"README's `mergekit-sd plan {recipe}`: {result.stderr}"
