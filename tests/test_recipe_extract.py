"""`recipe extract`: the recipe a merged file carries runs from any folder and gives the same
bytes; a file whose stored recipe is damaged gets one sentence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from mergekit_sd.errors import UserError
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


@pytest.mark.parametrize(("key", "command"), [("mergekit_sd.merged_loras", "lora merge"),
                                            ("mergekit_sd.extracted_from", "lora extract")])
def test_a_lora_of_our_lora_commands_is_said_to_have_no_recipe_but_its_inputs(tmp_path, key,
                                                                              command):
    from mergekit_sd.recipe.extract import extract_recipe
    from mergekit_sd.testing import write_lora

    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", metadata={key: "[]"})
    with pytest.raises(UserError) as refused:
        extract_recipe(lora)
    assert f"`mergekit-sd {command}`" in str(refused.value)
    assert "catalog lineage" in str(refused.value) and "bake" in str(refused.value)


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


def test_the_extracted_recipe_pins_the_baked_vae_and_refuses_another_file(tmp_path):
    for name, variant, seed in (("a", "sd1", 1), ("b", "sd1", 2), ("vae", "vae-sd", 9)):
        write_checkpoint(tmp_path / "models" / f"{name}.safetensors", variant, seed=seed)
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    (tmp_path / "recipes" / "sub" / "mix.yaml").write_text(RECIPE)
    assert run_cli("merge", tmp_path / "recipes" / "sub" / "mix.yaml").returncode == 0
    merged = tmp_path / "out" / "mix.safetensors"
    model = merged.read_bytes()
    assert run_cli("recipe", "extract", merged, "-o", "again.yaml",
                   cwd=tmp_path).returncode == 0
    vae = tmp_path / "models" / "vae.safetensors"
    vae_sha = hashlib.sha256(vae.read_bytes()).hexdigest()
    text = (tmp_path / "again.yaml").read_text()
    assert f"  vae_sha256: {vae_sha}\n" in text
    write_checkpoint(vae, "vae-sd", seed=10)  # the same name, another VAE
    rerun = run_cli("merge", tmp_path / "again.yaml", "--overwrite")
    line = 1 + text.splitlines().index(f"  vae_sha256: {vae_sha}")
    assert rerun.returncode == 2, rerun.stderr
    new_sha = hashlib.sha256(vae.read_bytes()).hexdigest()
    assert rerun.stderr.strip().splitlines()[-1] == (  # after merge's notes on the plan
        f"error: {tmp_path / 'again.yaml'}, line {line}, output.vae_sha256: vae.safetensors "
        f"has SHA256 {new_sha[:12]}…, not the {vae_sha[:12]}… the recipe expects")
    assert merged.read_bytes() == model


@pytest.mark.parametrize(("output", "words"), [
    ("{path: o.safetensors, vae_sha256: " + "ab" * 32 + "}",
     "output.vae_sha256: pins the file of output.vae, which is not given"),
    ("{path: o.safetensors, vae: v.safetensors, vae_sha256: abc}",
     "output.vae_sha256: give all 64 hex digits of the file's SHA256, not 'abc'")])
def test_a_vae_pin_without_a_vae_or_with_a_partial_hash_is_refused(tmp_path, output, words):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodels: {a: a.safetensors}\n"
                    "steps: [{name: m, method: copy, inputs: [a]}]\n"
                    f"output: {output}\n")
    result = run_cli("plan", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(words), result.stderr


def merged_in_out(tmp_path: Path) -> Path:
    """out/mix.safetensors, merged by `mix.yaml` from models/a and models/b."""
    for name, seed in (("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / "models" / f"{name}.safetensors", "sd1", seed=seed)
    (tmp_path / "mix.yaml").write_text(
        "version: 1\nmodels: {a: models/a.safetensors, b: models/b.safetensors}\n"
        "steps: [{name: mix, method: weighted_sum, inputs: [a, b], params: {alpha: 0.35}}]\n"
        "output: {path: out/mix.safetensors}\n")
    assert run_cli("merge", tmp_path / "mix.yaml").returncode == 0
    return tmp_path / "out" / "mix.safetensors"


def merged_then_moved(tmp_path: Path) -> tuple[Path, Path]:
    """(merged file, its models folder): merged into out/, then moved where web UIs keep
    models, as users do with a finished merge."""
    merged = merged_in_out(tmp_path)
    moved = tmp_path / "webui" / "models" / "Stable-diffusion" / "mix.safetensors"
    moved.parent.mkdir(parents=True)
    merged.rename(moved)
    return moved, tmp_path / "models"


def test_a_moved_merged_file_gives_a_recipe_that_finds_its_inputs_by_sha256(tmp_path):
    moved, models = merged_then_moved(tmp_path)
    extracted = run_cli("recipe", "extract", moved, "-o", "again.yaml", cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    assert extracted.stderr.strip() == (
        "note: inputs a and b of mix.safetensors are not at the path it recorded (was it moved "
        "since the merge?), so the recipe names them by SHA256, which `merge` finds through the "
        "catalog (`mergekit-sd catalog scan --hash` a folder that holds them)")
    text = (tmp_path / "again.yaml").read_text()
    for name in ("a", "b"):
        sha = hashlib.sha256((models / f"{name}.safetensors").read_bytes()).hexdigest()
        # the recorded path stays readable, as a comment
        assert (f"  {name}:\n    ref: sha256:{sha}  # mix.safetensors recorded "
                f"../models/{name}.safetensors, relative to its folder: no such file beside it "
                f"now\n    sha256: {sha}\n") in text
    catalog = tmp_path / "catalog.sqlite"
    assert run_cli("catalog", "add-root", models, "--scan", "--catalog", catalog).returncode == 0
    assert run_cli("catalog", "scan", "--hash", "--catalog", catalog).returncode == 0
    rerun = run_cli("merge", tmp_path / "again.yaml", "--out", tmp_path / "again.safetensors",
                    "--catalog", catalog)
    assert rerun.returncode == 0, rerun.stderr
    assert load_file(tmp_path / "again.safetensors").keys() == load_file(moved).keys()
    for key, tensor in load_file(moved).items():
        assert torch.equal(load_file(tmp_path / "again.safetensors")[key], tensor), key


def test_an_input_replaced_at_its_recorded_path_is_named_by_sha256(tmp_path):
    merged_in_out(tmp_path)
    b = tmp_path / "models" / "b.safetensors"
    sha = hashlib.sha256(b.read_bytes()).hexdigest()
    write_checkpoint(b, "sd1", seed=3)  # a newer version under the same name
    extracted = run_cli("recipe", "extract", tmp_path / "out" / "mix.safetensors", cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    assert "  a:\n    ref: models/a.safetensors\n" in extracted.stdout
    assert (f"  b:\n    ref: sha256:{sha}  # mix.safetensors recorded ../models/b.safetensors, "
            "relative to its folder: the file there now has another SHA256\n") in extracted.stdout
    assert extracted.stderr.startswith("note: input b of mix.safetensors is not at the path it "
                                       "recorded")


def test_the_recipe_of_a_converted_merge_remakes_the_merge_never_the_conversion(tmp_path):
    merged = merged_in_out(tmp_path)
    converted = tmp_path / "conv" / "mix-bf16.safetensors"
    assert run_cli("convert", merged, converted, "--dtype", "bf16").returncode == 0
    kept = converted.read_bytes()
    extracted = run_cli("recipe", "extract", converted, "-o", "again.yaml", cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    said = ("mix-bf16.safetensors is a bf16 conversion of mix.safetensors: the recipe remakes "
            "mix.safetensors as merged (fp16), not mix-bf16.safetensors")
    assert extracted.stderr.strip() == f"note: {said}; it writes conv/mix.safetensors"
    text = (tmp_path / "again.yaml").read_text()
    assert text.startswith(f"# {said}\n")
    assert "  path: conv/mix.safetensors\n" in text
    rerun = run_cli("merge", tmp_path / "again.yaml", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert converted.read_bytes() == kept
    # beside it, the merge itself again: its inputs are found from conv/ as from out/
    assert (tmp_path / "conv" / "mix.safetensors").read_bytes() == merged.read_bytes()


def test_a_conversion_named_like_its_merge_needs_another_output_path(tmp_path):
    merged = merged_in_out(tmp_path)
    converted = tmp_path / "conv" / "mix.safetensors"
    assert run_cli("convert", merged, converted, "--dtype", "bf16").returncode == 0
    for extra in ((), ("--output-path", converted)):
        refused = run_cli("recipe", "extract", converted, *extra)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip() == (
            f"error: {converted}: is a bf16 conversion of another mix.safetensors: the recipe "
            "remakes that file as merged (fp16), not this one, and its output here would "
            "replace this file with other bytes; give the recipe another output with "
            "--output-path")
    again = run_cli("recipe", "extract", converted, "--output-path", "remade.safetensors")
    assert again.returncode == 0, again.stderr
    assert "  path: remade.safetensors\n" in again.stdout


def test_a_conversion_of_a_conversion_still_names_the_merge(tmp_path):
    merged = merged_in_out(tmp_path)
    first, second = tmp_path / "bf16.safetensors", tmp_path / "conv" / "fp32.safetensors"
    assert run_cli("convert", merged, first, "--dtype", "bf16").returncode == 0
    assert run_cli("convert", first, second, "--dtype", "fp32").returncode == 0
    extracted = run_cli("recipe", "extract", second)
    assert extracted.returncode == 0, extracted.stderr
    assert extracted.stdout.startswith(
        "# fp32.safetensors is an fp32 conversion of mix.safetensors: the recipe remakes "
        "mix.safetensors as merged (fp16), not fp32.safetensors\n")


def test_a_lora_baked_into_a_converted_merge_has_a_recipe_for_itself(tmp_path):
    from mergekit_sd.testing import write_lora

    merged = merged_in_out(tmp_path)
    converted = tmp_path / "bf16.safetensors"
    assert run_cli("convert", merged, converted, "--dtype", "bf16").returncode == 0
    lora = write_lora(tmp_path / "lora.safetensors", "kohya-sd1")
    baked = tmp_path / "baked.safetensors"
    assert run_cli("bake", converted, lora, "-o", baked).returncode == 0
    extracted = run_cli("recipe", "extract", baked, cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    assert "conversion" not in extracted.stdout + extracted.stderr
    assert "bake_lora" in extracted.stdout and "  path: baked.safetensors\n" in extracted.stdout


def test_a_moved_merged_file_names_its_baked_vae_by_sha256_too(tmp_path):
    for name, variant, seed in (("a", "sd1", 1), ("b", "sd1", 2), ("vae", "vae-sd", 9)):
        write_checkpoint(tmp_path / "models" / f"{name}.safetensors", variant, seed=seed)
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    (tmp_path / "recipes" / "sub" / "mix.yaml").write_text(RECIPE)
    assert run_cli("merge", tmp_path / "recipes" / "sub" / "mix.yaml").returncode == 0
    moved = tmp_path / "deeper" / "still" / "mix.safetensors"
    moved.parent.mkdir(parents=True)
    (tmp_path / "out" / "mix.safetensors").rename(moved)
    extracted = run_cli("recipe", "extract", moved, cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    sha = hashlib.sha256((tmp_path / "models" / "vae.safetensors").read_bytes()).hexdigest()
    assert (f"  vae: sha256:{sha}  # mix.safetensors recorded ../models/vae.safetensors, "
            f"relative to its folder: no such file beside it now\n  vae_sha256: {sha}\n"
            ) in extracted.stdout
    assert extracted.stderr.startswith("note: inputs a, b and output.vae of mix.safetensors "
                                       "are not at the path it recorded")


# --- bakes: `bake` and a recipe's bake_lora step record their inputs as merges do -------------


def same_tensors(one: Path, two: Path) -> None:
    """`two` holds the tensors of `one` and no others, each with the same dtype and values."""
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert b[key].dtype == tensor.dtype and torch.equal(b[key], tensor), key


def test_a_bake_of_relative_paths_gives_a_recipe_that_runs_from_anywhere(tmp_path):
    """`bake` ran in src/, named its inputs relative to it and wrote into out/: the folder it
    ran in is recorded nowhere, so the file records them relative to its own folder, and the
    recipe extracted in elsewhere/ names the very base and LoRA and bakes the same tensors.
    (Not the same bytes: the bake keeps the base's metadata and its own tensor order, where
    `merge` writes a merge's.)"""
    from mergekit_sd.io.header import read_header
    from mergekit_sd.testing import write_lora

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    base = write_checkpoint(src / "models" / "base.safetensors", "sd1", seed=1)
    lora = write_lora(src / "loras" / "style.safetensors", "kohya-sd1")
    (tmp_path / "out").mkdir()
    elsewhere.mkdir()
    baked = run_cli("bake", "models/base.safetensors", "loras/style.safetensors:0.7",
                    "-o", "../out/baked.safetensors", cwd=src)
    assert baked.returncode == 0, baked.stderr
    output = tmp_path / "out" / "baked.safetensors"
    metadata = read_header(output).metadata
    models = json.loads(metadata["mergekit_sd.recipe"])["models"]
    assert {name: model["ref"] for name, model in models.items()} == {
        "base": "../src/models/base.safetensors", "style": "../src/loras/style.safetensors"}
    assert str(tmp_path) not in json.dumps(metadata)  # no folder of the user's, in any key
    extracted = run_cli("recipe", "extract", "../out/baked.safetensors", "-o", "again.yaml",
                        "--output-path", "again.safetensors", cwd=elsewhere)
    assert extracted.returncode == 0, extracted.stderr
    assert extracted.stderr == ""  # every input found at its recorded path
    doc = yaml.safe_load((elsewhere / "again.yaml").read_text())
    for name, found in (("base", base), ("style", lora)):
        ref = doc["models"][name]["ref"]
        assert not Path(ref).is_absolute() and (elsewhere / ref).resolve() == found.resolve()
    rerun = run_cli("merge", elsewhere / "again.yaml", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    same_tensors(output, elsewhere / "again.safetensors")


def test_a_bake_past_unmatched_modules_gives_a_recipe_that_bakes_past_them_too(tmp_path):
    """`bake --allow-unmatched` records allow_unmatched: true on its step, as a recipe's step
    records it: without it the extracted recipe would stop at the modules the bake left out."""
    from safetensors.torch import save_file

    from mergekit_sd.io.header import read_header
    from mergekit_sd.testing import write_lora

    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", seed=1)
    lora = write_lora(tmp_path / "partial.safetensors", "kohya-sd1")
    metadata = read_header(lora).metadata
    tensors = load_file(lora)
    for role, shape in (("lora_down", (4, 16)), ("lora_up", (16, 4))):
        tensors[f"lora_unet_not_a_block_to_q.{role}.weight"] = torch.ones(shape)
    save_file(tensors, lora, metadata=metadata)
    output = tmp_path / "baked.safetensors"
    baked = run_cli("bake", base, f"{lora}:0.6", "--allow-unmatched", "-o", output)
    assert baked.returncode == 0, baked.stderr
    step = json.loads(read_header(output).metadata["mergekit_sd.recipe"])["steps"][0]
    assert step["allow_unmatched"] is True
    extracted = run_cli("recipe", "extract", output, "-o", tmp_path / "again.yaml",
                        "--output-path", "again.safetensors")
    assert extracted.returncode == 0, extracted.stderr
    rerun = run_cli("merge", tmp_path / "again.yaml")
    assert rerun.returncode == 0, rerun.stderr
    same_tensors(output, tmp_path / "again.safetensors")


def test_the_recipe_of_a_bake_keeps_the_ema_weights_the_bake_kept(tmp_path):
    """A bake writes every tensor of the base, EMA too; its recipe says so (output.drop_ema:
    false), or re-running it would drop them, as a merge does by default."""
    from safetensors.torch import save_file

    from mergekit_sd.testing import write_lora

    tensors = load_file(write_checkpoint(tmp_path / "plain.safetensors", "sd1", seed=1))
    tensors.update({"model_ema.decay": torch.tensor(0.9999),
                    "model_ema.num_updates": torch.tensor(1000)})
    base = tmp_path / "base.safetensors"
    save_file(tensors, base, metadata={"format": "pt"})
    lora = write_lora(tmp_path / "style.safetensors", "kohya-sd1")
    baked = tmp_path / "baked.safetensors"
    assert run_cli("bake", base, lora, "-o", baked).returncode == 0
    assert "model_ema.decay" in load_file(baked)
    extracted = run_cli("recipe", "extract", baked, "-o", "again.yaml", "--output-path",
                        "again.safetensors", cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    assert "  drop_ema: false\n" in (tmp_path / "again.yaml").read_text()
    rerun = run_cli("merge", tmp_path / "again.yaml")
    assert rerun.returncode == 0, rerun.stderr
    same_tensors(baked, tmp_path / "again.safetensors")


def test_a_bake_lora_step_records_its_loras_relative_to_the_output_and_reruns_bytewise(
        tmp_path):
    from mergekit_sd.io.header import read_header
    from mergekit_sd.testing import write_lora

    write_checkpoint(tmp_path / "models" / "base.safetensors", "sd1", seed=1)
    write_lora(tmp_path / "loras" / "style.safetensors", "loha-sd1")
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    (tmp_path / "recipes" / "sub" / "bake.yaml").write_text(
        "version: 1\nmodels:\n  base: ../../models/base.safetensors\n"
        "  style: {ref: ../../loras/style.safetensors}\n"
        "steps:\n  - name: baked\n    method: bake_lora\n    inputs: [base]\n"
        "    loras: [{model: style, strength: 0.6, te_strength: 0.3}]\n"
        "output: {path: ../../out/baked.safetensors, date: '2026-11-21'}\n")
    merged = run_cli("merge", tmp_path / "recipes" / "sub" / "bake.yaml")
    assert merged.returncode == 0, merged.stderr
    output = tmp_path / "out" / "baked.safetensors"
    metadata = read_header(output).metadata
    models = json.loads(metadata["mergekit_sd.recipe"])["models"]
    assert {name: model["ref"] for name, model in models.items()} == {
        "base": "../models/base.safetensors", "style": "../loras/style.safetensors"}
    assert str(tmp_path) not in json.dumps(metadata)
    (tmp_path / "elsewhere").mkdir()
    extracted = run_cli("recipe", "extract", output, "-o", "again.yaml", "--output-path",
                        "../out/again.safetensors", cwd=tmp_path / "elsewhere")
    assert extracted.returncode == 0, extracted.stderr
    assert extracted.stderr == ""
    rerun = run_cli("merge", tmp_path / "elsewhere" / "again.yaml")
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "out" / "again.safetensors").read_bytes() == output.read_bytes()
VAE_NAMED_MODEL = """version: 1
models:
  a: models/a.safetensors
  vae: models/vae.safetensors
steps:
  - name: mix
    method: weighted_sum
    inputs: [a, vae]
    params: {alpha: 0.3}
output:
  path: out/mix.safetensors
  vae: models/baked.safetensors
  dtype: fp32
  date: "2026-11-21"
"""


def merged_with_a_model_named_vae(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """out/mix.safetensors, merged from a model named `vae` with another VAE baked in; the
    SHA256 of each file it read, by its name in the recipe."""
    shas = {}
    for name, file, variant, seed in (("a", "a", "sd1", 1), ("vae", "vae", "sd1", 2),
                                      ("output.vae", "baked", "vae-sd", 9)):
        path = write_checkpoint(tmp_path / "models" / f"{file}.safetensors", variant, seed=seed)
        shas[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "mix.yaml").write_text(VAE_NAMED_MODEL)
    merged = run_cli("merge", tmp_path / "mix.yaml")
    assert merged.returncode == 0, merged.stderr
    return tmp_path / "out" / "mix.safetensors", shas


def test_a_model_named_vae_and_the_baked_vae_each_keep_their_own_sha256(tmp_path):
    import json

    from mergekit_sd.io.header import read_header

    merged, shas = merged_with_a_model_named_vae(tmp_path)
    stored = json.loads(read_header(merged).metadata["mergekit_sd.recipe"])
    assert stored["models"]["vae"]["sha256"] == shas["vae"]
    assert stored["output"]["vae_sha256"] == shas["output.vae"]
    out = load_file(merged)
    a, model, baked = (load_file(tmp_path / "models" / f"{n}.safetensors")
                       for n in ("a", "vae", "baked"))
    assert torch.equal(out["first_stage_model.decoder.conv_in.weight"],
                       baked["decoder.conv_in.weight"])
    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    torch.testing.assert_close(out[unet], 0.7 * a[unet] + 0.3 * model[unet])
    extracted = run_cli("recipe", "extract", merged, "-o", "again.yaml", "--output-path",
                        "out/again.safetensors", cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    rerun = run_cli("merge", tmp_path / "again.yaml")
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "out" / "again.safetensors").read_bytes() == merged.read_bytes()


@pytest.mark.parametrize(("replaced", "field"), [("vae", "models.vae"),
                                                 ("baked", "output.vae_sha256")])
def test_the_pins_of_a_model_named_vae_and_of_the_baked_vae_check_their_own_files(
        tmp_path, replaced, field):
    merged, shas = merged_with_a_model_named_vae(tmp_path)
    assert run_cli("recipe", "extract", merged, "-o", "again.yaml", "--output-path",
                   "out/again.safetensors", cwd=tmp_path).returncode == 0
    variant = "sd1" if replaced == "vae" else "vae-sd"
    swapped = write_checkpoint(tmp_path / "models" / f"{replaced}.safetensors", variant, seed=5)
    rerun = run_cli("merge", tmp_path / "again.yaml")
    assert rerun.returncode == 2, rerun.stderr
    expected = shas["vae" if replaced == "vae" else "output.vae"]
    new = hashlib.sha256(swapped.read_bytes()).hexdigest()
    last = rerun.stderr.strip().splitlines()[-1]
    assert f", {field}: {swapped.name} has SHA256 {new[:12]}…, not the {expected[:12]}… " \
           "the recipe expects" in last, last
    assert not (tmp_path / "out" / "again.safetensors").exists()
