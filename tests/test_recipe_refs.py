"""Catalog references a recipe may use: `#ID` and `autov3:HASH` reach the catalog, as the
catalog's own commands take them; a bare name stays a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from catalog.edits import add_root
from catalog.entries import find_entry
from catalog.hash_cache import hash_pending
from catalog.scan import scan
from catalog.store import Store
from mergekit_sd.testing import write_checkpoint


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    write_checkpoint(root / "lib" / "model-a.safetensors", "sd1", seed=1)
    write_checkpoint(root / "lib" / "model-b.safetensors", "sd1", seed=2)
    with Store.open(root / "c.sqlite") as store:
        add_root(store, root / "lib")
        scan(store, jobs=1)
        hash_pending(store)
        b = find_entry(store, "model-b")
    return root, b


def plan_with(root, ref: str):
    recipe = root / "r.yaml"
    recipe.write_text(f"version: 1\nmodels: {{a: catalog:model-a, b: {ref}}}\n"
                      "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"
                      "output: {path: out.safetensors}\n")
    return run_cli("plan", recipe, "--json", "--catalog", root / "c.sqlite")


@pytest.mark.parametrize("form", ["id", "autov3"])
def test_id_and_autov3_references_resolve_through_the_catalog(library, form):
    root, b = library
    ref = {"id": f'"#{b.id}"', "autov3": f"autov3:{b.autov3[:12]}"}[form]
    result = plan_with(root, ref)
    assert result.returncode == 0, result.stderr
    inputs = {i["name"]: i for i in json.loads(result.stdout)["inputs"]}
    assert Path(inputs["b"]["path"]) == Path(b.path)


def test_a_bare_name_in_a_recipe_is_a_path(library):
    root, _ = library
    result = plan_with(root, "model-b")
    assert result.returncode == 2
    assert "models.b: model file" in result.stderr and "does not exist" in result.stderr


def test_a_bake_records_a_catalog_base_as_named_never_its_folder(library, tmp_path):
    """The base named `catalog:model-b`, as a LoRA so named is recorded: the reference and its
    SHA256, not the path the catalog found it at."""
    from mergekit_sd.io.header import read_header
    from mergekit_sd.testing import write_lora

    root, b = library
    lora = write_lora(tmp_path / "style.safetensors", "kohya-sd1")
    output = tmp_path / "baked.safetensors"
    baked = run_cli("bake", "catalog:model-b", lora, "-o", output, "--catalog",
                    root / "c.sqlite")
    assert baked.returncode == 0, baked.stderr
    metadata = read_header(output).metadata
    recipe = json.loads(metadata["mergekit_sd.recipe"])
    assert recipe["models"]["base"] == {"ref": "catalog:model-b", "sha256": b.sha256}
    assert str(root) not in json.dumps(metadata)


def test_a_file_whose_name_reads_as_a_reference_is_recorded_as_a_path(tmp_path, monkeypatch):
    from mergekit_sd.recipe.refs import is_path_ref, recorded_ref, resolve_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    named = tmp_path / "src" / "#1.safetensors"
    named.write_bytes(b"")
    beside = recorded_ref("src/#1.safetensors", Path("src/#1.safetensors"), tmp_path / "src")
    assert beside == "./#1.safetensors" and is_path_ref(beside)
    assert resolve_path(beside, tmp_path / "src") == named
    monkeypatch.chdir(tmp_path / "src")  # given as typed, from its own folder
    assert recorded_ref("#1.safetensors", Path("#1.safetensors"), tmp_path / "out") \
        == "../src/#1.safetensors"
    # a catalog reference stays one: no file of that name where the command ran
    assert recorded_ref("#7", tmp_path / "src" / "#1.safetensors", tmp_path / "out") == "#7"
