"""A recipe's sweep rendered straight from memory: no file written, and exactly the values (and
images) of the files `mergekit-sd merge` writes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mergekit_sd.io.reader import SafetensorsReader  # noqa: E402
from mergekit_sd.merge.executor import candidate_tensors, run_merge  # noqa: E402
from mergekit_sd.merge.plan import build_plan  # noqa: E402
from mergekit_sd.recipe.loader import load_recipe  # noqa: E402
from mergekit_sd.render.candidates import collect_candidates  # noqa: E402
from mergekit_sd.render.grids import parse_grid  # noqa: E402
from mergekit_sd.render.manifest import read_manifest  # noqa: E402
from mergekit_sd.render.presets import get_preset  # noqa: E402
from mergekit_sd.render.runner import RenderOptions, render_candidates  # noqa: E402
from mergekit_sd.testing.checkpoints import write_checkpoint  # noqa: E402

RECIPE = """\
version: 1
models:
  base: base.safetensors
  other: other.safetensors
steps:
  - name: mix
    method: weighted_sum
    inputs: [base, other]
    params:
      alpha: [0.3, 0.7]
output:
  path: merged/mix.safetensors
  dtype: fp16
"""
GRID = """\
prompts:
  - {name: cat, text: a photo of a cat, negative: blurry}
  - {name: house, text: a red house}
seeds: [5, 6]
size: 64
steps: 2
guidance: 4
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    write_checkpoint(folder / "base.safetensors", "sd1", seed=1)
    write_checkpoint(folder / "other.safetensors", "sd1", seed=2)
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder / "recipe.yaml"


def _options(out):
    torch.set_num_threads(1)
    return RenderOptions(parse_grid(GRID, "grid.yaml"), get_preset("standard"), out,
                         scheduler="euler_a")


def _pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.tobytes()


def test_candidate_tensors_are_the_values_the_merged_file_holds(recipe, tmp_path):
    plan = build_plan(load_recipe(recipe), out=tmp_path / "mix.safetensors")
    written = run_merge(plan)
    for name, path in written.items():
        with SafetensorsReader(path) as reader:
            yielded = dict(candidate_tensors(plan, name))
            assert list(yielded) == list(reader.tensors)
            for key, tensor in yielded.items():
                assert torch.equal(tensor, reader.read_tensor(key)), key


def test_a_sweep_renders_from_memory_as_its_files_would(recipe, tmp_path):
    sweep = collect_candidates([str(recipe)])
    assert [c.label for c in sweep] == ["mix@alpha=0.3", "mix@alpha=0.7"]
    in_memory = render_candidates(sweep, _options(tmp_path / "memory"))
    assert not (recipe.parent / "merged").exists()  # nothing was written for the merge
    assert not list(tmp_path.rglob("*.safetensors"))

    plan = build_plan(load_recipe(recipe), out=tmp_path / "files" / "mix.safetensors")
    files = [str(p) for p in run_merge(plan).values()]
    from_files = render_candidates(collect_candidates(files), _options(tmp_path / "disk"))
    for a, b in zip(sweep, from_files.candidates, strict=True):
        for prompt in ("cat", "house"):
            for seed in (5, 6):  # the same pixels; the parameters differ by the file's hash
                assert (_pixels(in_memory.image_file(a.label, prompt, seed))
                        == _pixels(from_files.image_file(b.label, prompt, seed)))

    manifest = read_manifest(tmp_path / "memory")
    entry = manifest["images"][0]
    assert entry["candidate_sha256"] is None
    assert entry["recipe"]["values"] == {"mix.alpha": 0.3}
    assert entry["recipe"]["path"] == str(recipe)
    hashes = entry["recipe"]["input_sha256"]
    assert set(hashes) == {"base", "other"} and all(len(h) == 64 for h in hashes.values())
    assert [c["load_s"] > 0 for c in manifest["candidates"]] == [True, True]


@pytest.mark.parametrize(("assignment", "labels", "values"), [
    ("mix.alpha=0.4", ["mix@alpha=0.4"], [{"mix.alpha": 0.4}]),
    ("mix.alpha=[0.2, 0.6]", ["mix@alpha=0.2", "mix@alpha=0.6"],
     [{"mix.alpha": 0.2}, {"mix.alpha": 0.6}]),
    ("mix.alpha={default: 0.4, blocks: {IN00: 1}}", ["mix@alpha={default:0.4,blocks:{IN00:1}}"],
     [{"mix.alpha": {"default": 0.4, "blocks": {"IN00": 1}}}]),
])
def test_set_values_name_the_candidate_and_its_recipe_record(recipe, monkeypatch, assignment,
                                                              labels, values):
    monkeypatch.chdir(recipe.parent)  # given relative, recorded absolute
    found = collect_candidates(["recipe.yaml"], assignments=[assignment])
    assert [c.label for c in found] == labels
    assert [c.recipe["values"] for c in found] == values
    assert all(c.recipe["set"] == [assignment] for c in found)
    assert all(c.recipe["path"] == str(recipe) for c in found)
    # one meaning for --set and sweeps alike: the label, every value that differs from the file
    assert [c.recipe["candidate"] for c in found] == labels


def test_a_recipes_inputs_are_recorded_from_the_base_the_manifest_states(recipe, monkeypatch,
                                                                         tmp_path):
    """Not from the folder the command ran in, which the manifest does not say."""
    import os

    monkeypatch.chdir(tmp_path)
    found = collect_candidates([os.path.relpath(recipe, tmp_path)])
    for cand in found:
        assert cand.recipe["inputs_relative_to"] == str(recipe.parent)  # absolute
        assert cand.recipe["inputs"] == {"base": "base.safetensors",
                                         "other": "other.safetensors"}


def test_a_set_value_renders_as_the_sweep_candidate_of_that_value_and_says_so(recipe,
                                                                              tmp_path):
    from PIL import Image

    chosen = collect_candidates([str(recipe)], assignments=["mix.alpha=0.3"])
    result = render_candidates(chosen, _options(tmp_path / "set"))
    swept = render_candidates(collect_candidates([str(recipe)]), _options(tmp_path / "sweep"))
    assert (_pixels(result.image_file("mix@alpha=0.3", "cat", 5))
            == _pixels(swept.image_file("mix@alpha=0.3", "cat", 5)))
    entry = read_manifest(tmp_path / "set")["images"][0]
    assert entry["candidate"] == "mix@alpha=0.3" and entry["file"].startswith("images/mix@")
    assert entry["recipe"]["values"] == {"mix.alpha": 0.3}
    assert entry["recipe"]["set"] == ["mix.alpha=0.3"]
    with Image.open(result.image_file("mix@alpha=0.3", "cat", 5)) as png:
        assert "Model: mix@alpha=0.3," in png.text["parameters"]
