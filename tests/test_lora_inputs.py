"""LoRA bake, merge and extract on inputs off the common path: UNet-only files, bad strengths,
LoRAs of a sibling architecture, wrong files in the wrong place. Each case is one a review
found mishandled; the bake's results are checked against `test_lora_bake`'s own formulas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import test_lora_bake as lora_bake
import torch
from safetensors.torch import load_file, save_file
from test_lora_bake import UNET, assert_one_sentence, expected_bake

from mergekit_sd.arch.architectures import ARCHITECTURES
from mergekit_sd.errors import UserError
from mergekit_sd.lora.bake import LoraUse, plan_bake
from mergekit_sd.lora.bake_run import run_bake
from mergekit_sd.lora.combine import merge_loras
from mergekit_sd.lora.extract import extract_lora
from mergekit_sd.lora.strengths import block_strengths
from mergekit_sd.testing import write_checkpoint, write_lora

# test_lora_bake's fixtures: its tiny F32 bases, its in-process CLI, one torch thread
bases, cli, one_torch_thread = lora_bake.bases, lora_bake.cli, lora_bake.one_torch_thread


@pytest.fixture(scope="module")
def unet_only(tmp_path_factory) -> tuple[Path, Path]:
    """Two SD1 UNet-only files (the `unet` folder format: ldm keys without a prefix)."""
    root = tmp_path_factory.mktemp("unet")
    return (write_checkpoint(root / "unet.safetensors", "sd1-unet", dtype="F32"),
            write_checkpoint(root / "unet_b.safetensors", "sd1-unet", dtype="F32", seed=1))


def test_a_diffusers_named_lora_bakes_into_a_unet_only_file(tmp_path, bases, unet_only):
    """kohya's SD1 names are diffusers module paths: they need the UNet's key map, which an
    unprefixed UNet has as well as a whole checkpoint."""
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", alpha=3.0, dtype="F32")
    whole = expected_bake(load_file(bases["sd1"]), lora, "kohya-sd1", 0.7)
    plan = plan_bake(unet_only[0], [LoraUse("l", lora, 0.7)], tmp_path / "out.safetensors")
    assert {u.lora for u in plan.unmatched} == {"l"}  # the text-encoder modules, listed
    assert all(m.startswith("lora_te_") for m in plan.unmatched[0].modules)
    baked = load_file(run_bake(plan))
    base = load_file(unet_only[0])
    changed = [k for k in base if not torch.equal(base[k], baked[k])]
    assert len(changed) > 100
    for key in changed:  # the same change as in the whole checkpoint (same UNet values)
        expected = whole[UNET + key] - load_file(bases["sd1"])[UNET + key].float() + base[key]
        assert torch.allclose(baked[key], expected, rtol=0, atol=1e-5), key


def test_a_lora_is_extracted_from_two_unet_only_files(tmp_path, unet_only):
    report = extract_lora(unet_only[1], unet_only[0], tmp_path / "x.safetensors", rank=2)
    assert report.modules > 100
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "x.safetensors"))


def unet_alone(path: Path, out: Path) -> Path:
    """The UNet of the checkpoint at `path` saved alone, as ComfyUI's "save UNet" does."""
    tensors = load_file(path)
    save_file({k[len(UNET):]: v for k, v in tensors.items() if k.startswith(UNET)}, out)
    return out


def test_extract_matches_a_unet_alone_with_a_whole_checkpoint(tmp_path, bases, cli):
    """A UNet saved alone against a whole checkpoint (either way round): the UNets are
    compared (the keys differ by model.diffusion_model.), not said to be "equal"."""
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", dtype="F32")
    tuned = tmp_path / "tuned.safetensors"
    run_bake(plan_bake(bases["sd1"], [LoraUse("l", lora, 0.8)], tuned))
    tuned_unet = unet_alone(tuned, tmp_path / "tuned_unet.safetensors")
    base_unet = unet_alone(bases["sd1"], tmp_path / "base_unet.safetensors")
    expected = extract_lora(tuned_unet, base_unet, tmp_path / "both.safetensors", rank=4,
                            clamp_quantile=1)
    assert expected.modules == 192 and expected.parts_left_out is None
    reference = load_file(tmp_path / "both.safetensors")
    for i, (t, b) in enumerate(((tuned_unet, bases["sd1"]), (tuned, base_unet))):
        out = tmp_path / f"x{i}.safetensors"
        code, stdout, err = cli("lora", "extract", t, b, "--rank", "4", "--clamp-quantile", "1",
                                "-o", out)
        assert code == 0, err
        assert "extracted 192 modules" in stdout
        assert "holds the UNet alone: only the UNets were compared" in stdout
        got = load_file(out)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in got)


# --- strengths are finite numbers ----------------------------------------------------------------


@pytest.fixture
def sd1_lora(tmp_path) -> Path:
    return write_lora(tmp_path / "l.safetensors", "kohya-sd1")


@pytest.mark.parametrize("args", [
    (":nan",), (":inf",), (":-inf",), (":1_0",), (":0.5:nan",), ("", "--te-strength", "nan"),
    ("", "--blocks", "nan" + ",1" * 16), ("", "--blocks", "1e999" + ",1" * 16),
], ids=lambda a: " ".join(a).strip() or "plain")
def test_a_strength_that_is_no_finite_number_is_one_sentence(tmp_path, bases, cli, sd1_lora,
                                                             args):
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("bake", bases["sd1"], f"{sd1_lora}{args[0]}", *args[1:], "-o", out),
                        2)
    assert "finite" in cli.last_err
    assert not out.exists()


@pytest.mark.parametrize("args", [
    (":1e300",), (":1:-1e39",), ("", "--te-strength", "1e39"),
    ("", "--blocks", "1e39" + ",1" * 16), (":3e38", "--blocks", "2" + ",1" * 16),
], ids=lambda a: " ".join(a).strip())
def test_a_strength_beyond_float32_is_one_sentence(tmp_path, bases, cli, sd1_lora, args):
    """1e300 is a finite Python float but no float32, in which LoRAs are applied: it was a
    traceback from torch (addmm's alpha), now one sentence, as is a block strength times a
    strength that leaves float32's range."""
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("bake", bases["sd1"], f"{sd1_lora}{args[0]}", *args[1:], "-o", out),
                        2)
    assert "float32" in cli.last_err and not out.exists()


@pytest.mark.parametrize("field", ["strength: 1e300", "te_strength: 1e39",
                                   "blocks: {IN*: 1e39}"])
def test_a_recipe_strength_beyond_float32_is_refused_while_planning(tmp_path, bases, cli,
                                                                    sd1_lora, field):
    recipe = tmp_path / "bake.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  l: {sd1_lora}\nsteps:\n"
        "  - name: baked\n    method: bake_lora\n    inputs: [base]\n    loras:\n"
        f"      - {{model: l, {field}}}\noutput:\n  path: {tmp_path / 'out.safetensors'}\n")
    for command in ("plan", "merge"):
        assert_one_sentence(*cli(command, recipe), 2)
        assert "steps.0.loras" in cli.last_err and "float32" in cli.last_err
    assert not (tmp_path / "out.safetensors").exists()


LORA_FORMS = ("give blocks as {BLOCK, RANGE or PATTERN: strength} (e.g. {IN*: 0.5, OUT05: 1.2, "
              "default: 1}), as one strength per block in order, a list or a comma-separated "
              "string as LoRA Block Weight writes them (26 or 17 values for SD1, 20 or 12 for "
              "SDXL; see `mergekit-sd blocks ARCH`), or as a preset (all, none, in, mid, out, "
              "in-mid, mid-out, double, single)")


@pytest.mark.parametrize(("blocks", "field", "problem"), [
    ("0.5", "blocks", LORA_FORMS),
    ("true", "blocks", LORA_FORMS),
    ("[[1]]", "blocks.0", "a sweep (a list of values) is only possible on a parameter or its "
                          "default, not on a block's value; give each block one number"),
    ("[a, b]", "blocks.0", "'a' is not a finite number; give each block a number, such as 0.5"),
    ("[true, 1]", "blocks.0", "true is not a finite number; give each block a number, such as "
                              "0.5"),
    ("{IN*: x}", "blocks.IN*", "'x' is not a finite number; give each block a number, such as "
                               "0.5"),
    ("{IN*: {a: 1}}", "blocks.IN*", "{'a': 1} is not a finite number; give each block a "
                                    "number, such as 0.5"),
    ("outt", "blocks", f"'outt' is none of the forms blocks takes; {LORA_FORMS}"),
    ("'0,1,1'", "blocks", "3 block strengths given; SD1.x takes 26 or 17 (see `mergekit-sd "
                          "blocks sd1`)"),
    ("{XX: 1}", "blocks", "'XX' matches no block of SD1.x (see `mergekit-sd blocks sd1`)"),
], ids=["number", "bool", "list-in-list", "words", "bool-in-list", "word-in-map",
        "map-in-map", "typo", "short", "no-block"])
def test_a_recipe_lora_blocks_of_no_form_is_one_sentence_at_its_field(tmp_path, bases, cli,
                                                                       sd1_lora, blocks,
                                                                       field, problem):
    """Not pydantic's own words ("Input should be a valid string" for a number), and a list
    or preset that does not fit is said at the LoRA's own blocks, as merge params' are."""
    recipe = tmp_path / "bake.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  l: {sd1_lora}\nsteps:\n"
        "  - name: baked\n    method: bake_lora\n    inputs: [base]\n    loras:\n"
        f"      - {{model: l, blocks: {blocks}}}\noutput:\n  path: {tmp_path / 'o.safetensors'}\n")
    for command in ("plan", "merge"):
        assert_one_sentence(*cli(command, recipe), 2)
        assert cli.last_err.strip() == (f"error: {recipe}, line 10, steps.0.loras.0.{field}: "
                                        f"{problem}"), cli.last_err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("blocks", [
    "[" + ", ".join(["1e-3"] * 26) + "]",  # YAML reads 1e-3 (no dot) as text
    "{IN*: 1e-3, default: 1}", "'" + ",".join(["0.5"] * 17) + "'", "mid-out",
    "{IN00-IN05: 0.2, M00: 1}"])
def test_a_recipe_lora_takes_the_block_forms_the_cli_and_merge_params_take(tmp_path, bases,
                                                                           cli, sd1_lora,
                                                                           blocks):
    recipe = tmp_path / "bake.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  l: {sd1_lora}\nsteps:\n"
        "  - name: baked\n    method: bake_lora\n    inputs: [base]\n    loras:\n"
        f"      - {{model: l, blocks: {blocks}}}\noutput:\n  path: {tmp_path / 'o.safetensors'}\n")
    code, out, err = cli("plan", recipe)
    assert code == 0, err


def test_a_lora_merge_strength_that_is_no_finite_number_is_one_sentence(tmp_path, cli,
                                                                        sd1_lora):
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("lora", "merge", f"{sd1_lora}:nan", sd1_lora, "-o", out), 2)
    assert "is not STRENGTH" in cli.last_err and "finite" in cli.last_err and not out.exists()
    # the API, as recipes and scripts call it
    with pytest.raises(UserError, match="strength inf is not a finite number"):
        merge_loras([(sd1_lora, float("inf")), (sd1_lora, 1.0)], out)
    assert_one_sentence(*cli("lora", "merge", f"{sd1_lora}:1e300", sd1_lora, "-o", out), 2)
    assert "float32" in cli.last_err and not out.exists()


@pytest.mark.parametrize("strengths", [(float("nan"), None), (1.0, float("inf"))])
def test_the_bake_api_refuses_strengths_that_are_no_finite_number(tmp_path, bases, sd1_lora,
                                                                  strengths):
    with pytest.raises(UserError, match="finite"):
        plan_bake(bases["sd1"], [LoraUse("l", sd1_lora, *strengths)], tmp_path / "o.safetensors")


@pytest.mark.parametrize("spec", [[float("nan")] * 26, {"IN*": float("inf")}, {"IN*": "abc"}])
def test_block_lists_and_maps_hold_finite_numbers(tmp_path, bases, sd1_lora, spec):
    with pytest.raises(UserError, match="finite"):
        plan_bake(bases["sd1"], [LoraUse("l", sd1_lora, 1.0, None, spec)],
                  tmp_path / "o.safetensors")


# --- SD1 and SD2 are different architectures -----------------------------------------------------


def test_an_sd2_lora_is_refused_for_an_sd1_base_even_when_allowed_unmatched(tmp_path, bases, cli):
    lora = write_lora(tmp_path / "sd2.safetensors", "kohya-sd2")
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("bake", bases["sd1"], lora, "-o", out, "--allow-unmatched"), 2)
    assert "SD2" in cli.last_err and "SD1" in cli.last_err and not out.exists()


def test_a_lora_merge_of_an_sd1_and_an_sd2_lora_is_refused(tmp_path, cli):
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1")
    b = write_lora(tmp_path / "b.safetensors", "kohya-sd2")
    assert_one_sentence(*cli("lora", "merge", a, b, "-o", tmp_path / "m.safetensors"), 2)
    assert "different architectures" in cli.last_err


def test_lora_extract_refuses_sd1_against_sd2_and_a_lora_for_a_checkpoint(tmp_path, bases, cli):
    out = tmp_path / "x.safetensors"
    assert_one_sentence(*cli("lora", "extract", bases["sd1"], bases["sd2"], "--rank", "2",
                             "-o", out), 2)
    assert "one architecture" in cli.last_err
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    assert_one_sentence(*cli("lora", "extract", lora, bases["sd1"], "--rank", "2", "-o", out), 2)
    assert "not a checkpoint to extract from" in cli.last_err
    assert not out.exists()


def test_a_folder_given_as_a_model_is_said_to_be_a_folder(tmp_path, bases, cli, monkeypatch):
    """A diffusers folder is no catalog name: said so, not "no catalog entry matches"."""
    folder = tmp_path / "dfold"
    (folder / "unet").mkdir(parents=True)
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    out = tmp_path / "x.safetensors"
    catalog = ("--catalog", tmp_path / "c.sqlite")
    for args in (("bake", folder, lora), ("bake", bases["sd1"], folder),
                 ("lora", "extract", folder, bases["sd1"], "--rank", "2")):
        assert_one_sentence(*cli(*args, "-o", out, *catalog), 2)
        assert f"{folder}: is a folder" in cli.last_err, cli.last_err
    monkeypatch.chdir(tmp_path)  # a bare name, asked of the catalog first
    assert_one_sentence(*cli("bake", "dfold", lora, "-o", out, *catalog), 2)
    assert "dfold: is a folder" in cli.last_err, cli.last_err


# --- what the bake reports ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [(":0",), ("", "--blocks", "none"), (":0:0.5", "--blocks", "in")])
def test_the_count_of_changed_tensors_leaves_out_those_at_strength_0(tmp_path, bases, cli,
                                                                     sd1_lora, args):
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli("bake", bases["sd1"], f"{sd1_lora}{args[0]}", *args[1:], "-o", out)
    assert code == 0, err
    base, baked = load_file(bases["sd1"]), load_file(out)
    really = sum(not torch.equal(base[k], baked[k]) for k in base)
    # the tensors some module reaches at a strength other than 0 (counted from the plan: a
    # delta may still round away in a narrow dtype, so not "changed")
    assert f": {really} tensors a LoRA touches →" in stdout


@pytest.mark.parametrize(("arch", "preset"), [
    ("sd1", "double"), ("sd1", "single"), ("flux-dev", "in"), ("flux-dev", "out"),
    ("flux-dev", "mid-out"),
])
def test_a_preset_of_another_architectures_blocks_is_refused(arch, preset):
    with pytest.raises(UserError, match="no block of .* is in this preset"):
        block_strengths(preset, ARCHITECTURES[arch], "blocks")


def test_the_presets_an_architecture_has_are_kept():
    for arch, preset in (("sd1", "out"), ("sd1", "none"), ("flux-dev", "double"),
                         ("flux-dev", "all"), ("sdxl", "in-mid")):
        strengths = block_strengths(preset, ARCHITECTURES[arch], "blocks")
        assert strengths["BASE"] == (preset != "none")


# --- lora merge ---------------------------------------------------------------------------------


@pytest.fixture
def two_sd1_loras(tmp_path) -> tuple[Path, Path]:
    return (write_lora(tmp_path / "a.safetensors", "kohya-sd1", seed=1),
            write_lora(tmp_path / "b.safetensors", "kohya-sd1", seed=2))


def test_lora_merge_refuses_a_base_of_another_architecture_or_a_lora_as_base(
        tmp_path, bases, cli, two_sd1_loras):
    out = tmp_path / "m.safetensors"
    for base, says in ((bases["sdxl"], "is SDXL base and the LoRAs are for SD1.x"),
                       (two_sd1_loras[0], "not a checkpoint")):
        assert_one_sentence(*cli("lora", "merge", *two_sd1_loras, "--base", base,
                                 "--allow-unmatched", "-o", out), 2)
        assert says in cli.last_err
    assert not out.exists()


# --- lora extract -------------------------------------------------------------------------------


def test_extract_reports_tensors_of_another_shape_and_those_of_one_model(tmp_path, bases, cli):
    inpainting = write_checkpoint(tmp_path / "inpainting.safetensors", "sd1-inpainting",
                                  dtype="F32", seed=3)
    code, stdout, err = cli("lora", "extract", inpainting, bases["sd1"], "--rank", "2",
                            "-o", tmp_path / "x.safetensors")
    assert code == 0, err
    conv_in = UNET + "input_blocks.0.0.weight"
    assert "1 tensors are in one model only or differ in shape" in stdout
    assert f"{conv_in} ([" in stdout
    report = extract_lora(inpainting, bases["sd1"], tmp_path / "y.safetensors", rank=2)
    assert [u.split(" ")[0] for u in report.unlike] == [conv_in]


@pytest.mark.parametrize("option", [("--rank", "0"), ("--rank", "-3"),
                                    ("--rank", "4", "--clamp-quantile", "0"),
                                    ("--rank", "4", "--clamp-quantile", "-1"),
                                    ("--rank", "4", "--clamp-quantile", "2"),
                                    ("--rank", "4", "--clamp-quantile", "nan")])
def test_lora_merge_checks_its_rank_and_clamp_quantile(tmp_path, bases, cli, two_sd1_loras,
                                                       option):
    out = tmp_path / "m.safetensors"
    assert_one_sentence(*cli("lora", "merge", *two_sd1_loras, "--base", bases["sd1"], *option,
                             "-o", out), 2)
    assert option[-2] in cli.last_err and not out.exists()


def test_lora_merge_refuses_a_clamp_quantile_without_a_rank(tmp_path, bases, cli,
                                                            two_sd1_loras):
    """Concatenation has no factors to clamp: the option did nothing, without a word."""
    out = tmp_path / "m.safetensors"
    for quantile in ("0.5", "1"):
        assert_one_sentence(*cli("lora", "merge", *two_sd1_loras, "--clamp-quantile", quantile,
                                 "-o", out), 2)
        assert "--rank" in cli.last_err and not out.exists()
    with pytest.raises(UserError, match="--rank"):
        merge_loras([(p, 1.0) for p in two_sd1_loras], out, clamp_quantile=0.5)
    code, _, err = cli("lora", "merge", *two_sd1_loras, "--rank", "2", "--clamp-quantile", "0.5",
                       "--base", bases["sd1"], "-o", out)
    assert code == 0 and out.exists(), err


def test_lora_merge_lists_modules_that_do_not_fit_the_layout(tmp_path, cli, two_sd1_loras):
    """Tiny LoRAs against the full-size SD1 layout (no --base): SVD, which builds every
    delta in its weight's shape, lists each module with its shapes."""
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli("lora", "merge", *two_sd1_loras, "--rank", "4", "-o", out)
    assert code == 1 and "Traceback" not in stdout + err
    assert "do not fit" in err and "cannot go into the merged LoRA" in err
    assert not out.exists()


def with_module_changed(path: Path, change) -> tuple[Path, str]:
    """The LoRA at `path` with its first UNet module's tensors passed through `change`."""
    tensors = load_file(path)
    module = sorted(k for k in tensors if k.startswith("lora_unet_"))[0].split(".")[0]
    change(tensors, module)
    save_file(tensors, path)
    return path, module


def drop_up(tensors, module):
    del tensors[f"{module}.lora_up.weight"]


def rank_zero(tensors, module):
    down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
    tensors[f"{module}.lora_down.weight"] = down[:0].clone()
    tensors[f"{module}.lora_up.weight"] = up[:, :0].clone()


def ranks_differ(tensors, module):
    up = tensors[f"{module}.lora_up.weight"]
    tensors[f"{module}.lora_up.weight"] = up[:, :-1].clone()


@pytest.mark.parametrize(("change", "why"), [
    (drop_up, "malformed: it has no up tensor"), (rank_zero, "malformed: its rank is 0"),
    (ranks_differ, "malformed: up (16, 3, 1, 1) has rank 3 and down (4, 16, 1, 1) rank 4")])
def test_a_malformed_module_is_listed_by_bake_and_merge(tmp_path, bases, cli, two_sd1_loras,
                                                        change, why):
    """Listed as malformed, with the reason, not as naming no weight of the base (it does
    name one), and counted in the singular."""
    bad, module = with_module_changed(write_lora(tmp_path / "bad.safetensors", "kohya-sd1"),
                                      change)
    out = tmp_path / "out.safetensors"
    for args, failed in (
            (("bake", bases["sd1"], bad), "1 LoRA module cannot be baked (1 malformed or "
                                          "unusable)"),
            (("lora", "merge", bad, two_sd1_loras[0], "--base", bases["sd1"]),
             "1 LoRA module cannot go into the merged LoRA (1 malformed or unusable)"),
            (("lora", "merge", bad, two_sd1_loras[0], "--base", bases["sd1"], "--rank", "4"),
             "1 LoRA module cannot go into the merged LoRA (1 malformed or unusable)")):
        code, stdout, err = cli(*args, "-o", out)
        assert code == 1 and "Traceback" not in stdout + err, err
        assert "bad.safetensors: 1 module is malformed or unusable" in err, err
        assert f"{module} ({why}" in err and failed in err, err
        assert "no weight" not in err and "1 modules" not in err
    assert not out.exists()


def test_a_file_with_no_tensors_is_said_to_hold_none(tmp_path, bases, cli):
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    assert_one_sentence(*cli("bake", bases["sd1"], empty, "-o", tmp_path / "o.safetensors"), 2)
    assert "empty.safetensors: holds no tensors, so it is not a LoRA" in cli.last_err


def test_a_dora_scale_of_another_size_is_listed_not_a_traceback(tmp_path, bases, cli):
    """DoRA magnitudes are one per output (or input) channel; one of another size was a
    traceback from the bake's arithmetic, with or without --allow-unmatched."""
    lora = write_lora(tmp_path / "dora.safetensors", "dora-sdxl", alpha=3.0)
    tensors = load_file(lora)
    key = sorted(k for k in tensors if k.endswith(".dora_scale"))[0]
    tensors[key] = tensors[key][:7].clone()
    save_file(tensors, lora)
    module = key.removesuffix(".dora_scale")
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli("bake", bases["sdxl"], lora, "-o", out)
    assert code == 1 and "Traceback" not in stdout + err and not out.exists(), err
    assert f"{module} (malformed: dora_scale (7, 1)" in err
    code, stdout, err = cli("bake", bases["sdxl"], lora, "-o", out, "--allow-unmatched")
    assert code == 0 and out.exists(), err
    assert f"{module} (malformed: dora_scale (7, 1)" in err


def test_lora_merge_lists_the_parts_of_fused_weights_that_do_not_fit_the_layout(tmp_path, cli):
    """kohya's whole FLUX qkv with diffusers' separate q, k and v: the parts are padded to the
    whole weight's rows, which the shipped layout gives; tiny LoRAs do not fit it, and were a
    traceback. They are listed, as with --rank."""
    a = write_lora(tmp_path / "k.safetensors", "kohya-flux")
    b = write_lora(tmp_path / "d.safetensors", "diffusers-flux")
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli("lora", "merge", a, b, "-o", out)
    assert code == 1 and "Traceback" not in stdout + err and not out.exists(), err
    assert "transformer.transformer_blocks.0.attn.to_q (up (48, 4) and down (4, 48) do not fit " \
           "(3072, 3072) in the shipped layout; pass --base)" in err, err
    assert "cannot go into the merged LoRA" in err


def test_lora_merge_of_a_fused_weights_part_alone_goes_on_the_whole_weight(tmp_path, bases):
    """A diffusers FLUX LoRA with q but no k or v: kohya's format names no rows of BFL's qkv,
    so the merged module is one of the whole weight (it was refused as covering different
    rows)."""
    a = write_lora(tmp_path / "k.safetensors", "kohya-flux", seed=1, dtype="F32")
    b = write_lora(tmp_path / "d.safetensors", "diffusers-flux", seed=2, dtype="F32")
    tensors = load_file(b)
    save_file({k: v for k, v in tensors.items()
               if not any(p in k for p in ("to_k", "to_v", "add_k", "add_v", "proj_mlp"))}, b)
    merged = tmp_path / "merged.safetensors"
    for loras in ([(b, 0.5), (b, 0.5)], [(a, 0.7), (b, 0.5)]):
        merge_loras(loras, merged, base=bases["flux-dev"], dtype="fp32")
        uses = [LoraUse(f"l{i}", p, w) for i, (p, w) in enumerate(loras)]
        separately = lora_bake.bake(bases["flux-dev"], uses, tmp_path / "s.safetensors")
        together = lora_bake.bake(bases["flux-dev"], [LoraUse("m", merged)],
                                  tmp_path / "t.safetensors")
        lora_bake.assert_same_bake(separately, together, load_file(bases["flux-dev"]))
        merged.unlink()


def test_lora_merge_lists_the_bias_changes_of_full_diff_modules(tmp_path, bases, cli,
                                                                two_sd1_loras):
    full = write_lora(tmp_path / "full.safetensors", "full-diff-sd1")
    out = tmp_path / "m.safetensors"
    args = ("lora", "merge", two_sd1_loras[0], full, "--base", bases["sd1"], "--rank", "8",
            "-o", out)
    code, _, err = cli(*args)
    assert code == 1 and ".diff_b (a bias change" in err and not out.exists()
    code, _, err = cli(*args, "--allow-unmatched")
    assert code == 0 and ".diff_b (a bias change" in err and out.exists()


def test_extract_says_apart_which_text_encoder_weights_it_left_out(tmp_path, cli):
    """--no-text-encoders: the text-encoder weights that differ are left out on request, not
    "other tensors a LoRA cannot carry"."""
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F32")
    tuned = write_checkpoint(tmp_path / "tuned.safetensors", "sd1", dtype="F32", seed=5)
    every = extract_lora(tuned, base, tmp_path / "every.safetensors", rank=2)
    unet = extract_lora(tuned, base, tmp_path / "unet.safetensors", rank=2, text_encoders=False)
    assert unet.text_encoders_left_out == every.modules - unet.modules == 72
    assert unet.other_differences == every.other_differences
    code, stdout, err = cli("lora", "extract", tuned, base, "--rank", "2", "--no-text-encoders",
                            "-o", tmp_path / "cli.safetensors")
    assert code == 0, err
    assert "72 text-encoder weights differ and were left out (--no-text-encoders)" in stdout
    assert f"{len(every.other_differences)} other tensors differ" in stdout


# --- the output -----------------------------------------------------------------------------------


def output_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.safetensors").mkdir()
    return [(tmp_path / "afile" / "x.safetensors", "is a file, not a folder"),
            (tmp_path / "adir.safetensors", "is a directory"),
            (tmp_path / "y.ckpt", "must end in .safetensors"),
            # no one can create a file there, root included (tests may run as root)
            (Path("/proc/x.safetensors"), "its folder /proc cannot be written")]


def test_bad_outputs_are_one_sentence_before_any_work(tmp_path, bases, cli, two_sd1_loras):
    tuned = write_checkpoint(tmp_path / "tuned.safetensors", "sd1", dtype="F32", seed=5)
    for output, says in output_cases(tmp_path):
        for args in (("bake", bases["sd1"], two_sd1_loras[0]),
                     ("lora", "merge", *two_sd1_loras),
                     ("lora", "extract", tuned, bases["sd1"], "--rank", "2")):
            assert_one_sentence(*cli(*args, "-o", output, "--overwrite"), 2)
            assert says in cli.last_err, (args, cli.last_err)
    assert not (tmp_path / "y.ckpt").exists() and list(tmp_path.rglob("*.partial")) == []


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, cli,
                                                                   two_sd1_loras):
    """-o naming an input (by its path, another spelling, a symlink or a hard link) would
    replace it: refused, --overwrite or not, and the input is left as it was."""
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F32")
    tuned = write_checkpoint(tmp_path / "tuned.safetensors", "sd1", dtype="F32", seed=5)
    a, b = two_sd1_loras
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(base)
    os.link(a, tmp_path / "hard.safetensors")
    before = {p: p.read_bytes() for p in (base, tuned, a, b)}
    cases = [
        (("bake", base, a), a), (("bake", base, a), tmp_path / "sub" / ".." / "base.safetensors"),
        (("bake", base, a), tmp_path / "hard.safetensors"),
        (("lora", "merge", a, b), a), (("lora", "merge", a, b, "--base", base),
                                       tmp_path / "link.safetensors"),
        (("lora", "extract", tuned, base, "--rank", "2"), tuned),
        (("lora", "extract", tuned, base, "--rank", "2"), tmp_path / "link.safetensors"),
    ]
    for args, output in cases:
        assert_one_sentence(*cli(*args, "-o", output, "--overwrite"), 2)
        assert "the same file" in cli.last_err and "choose another -o" in cli.last_err
    assert {p: p.read_bytes() for p in before} == before
    with pytest.raises(UserError, match="the same file"):  # the API, as recipes and scripts call it
        plan_bake(base, [LoraUse("a", a)], tmp_path / "hard.safetensors")


# --- LoRA arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "split"), [
    ("sha256:7996564991", ("sha256:7996564991", [])),
    ("sha256:7996564991:0.5", ("sha256:7996564991", [0.5])),
    ("autov3:12e45", ("autov3:12e45", [])),
    ("catalog:1234:0.5:0.2", ("catalog:1234", [0.5, 0.2])),
])
def test_a_catalog_hash_made_of_digits_is_no_strength(arg, split):
    from mergekit_sd.cli_lora import _split_strengths

    assert _split_strengths(arg, 2) == split


def test_a_bad_strength_after_a_catalog_name_is_blamed_on_the_strength(tmp_path, bases, cli):
    root = tmp_path / "models"
    root.mkdir()
    write_lora(root / "mychar.safetensors", "kohya-sd1")
    catalog = tmp_path / "catalog.sqlite"
    for args in (("add-root", root), ("scan",)):
        code, _, err = cli("catalog", *args, "--catalog", catalog)
        assert code == 0, err
    for strength in ("abc", "0.5:0.2:0.1"):
        assert_one_sentence(*cli("bake", "--catalog", catalog, bases["sd1"],
                                 f"mychar:{strength}", "-o", tmp_path / "o.safetensors"), 2)
        assert f"'{strength}' after the file name is not STRENGTH" in cli.last_err


def test_an_existing_lora_file_named_like_a_catalog_reference_is_that_file(tmp_path, bases,
                                                                          cli, monkeypatch):
    write_lora(tmp_path / "#1.safetensors", "kohya-sd1")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("bake", "--catalog", tmp_path / "empty.sqlite", bases["sd1"],
                       "#1.safetensors:0.5", "-o", tmp_path / "o.safetensors")
    assert code == 0, err


# --- LyCORIS' own module names --------------------------------------------------------------------


def test_lycoris_prefixed_names_bake_like_kohya_names(tmp_path, bases, cli):
    """LyCORIS outside sd-scripts (SimpleTuner) names a UNet module lycoris_ + its diffusers
    path, which kohya names lora_unet_ + the same path: the bakes are equal."""
    kohya = write_lora(tmp_path / "kohya.safetensors", "kohya-sd1", alpha=3.0)
    tensors = load_file(kohya)
    renamed = tmp_path / "lycoris.safetensors"
    save_file({k.replace("lora_unet_", "lycoris_"): v for k, v in tensors.items()}, renamed)
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for lora, out in zip((kohya, renamed), outs, strict=True):
        code, _, err = cli("bake", bases["sd1"], f"{lora}:0.7", "-o", out)
        assert code == 0, err
    a, b = load_file(outs[0]), load_file(outs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[UNET + "input_blocks.1.1.proj_in.weight"],
                           load_file(bases["sd1"])[UNET + "input_blocks.1.1.proj_in.weight"])
    code, stdout, _ = cli("inspect", renamed)
    assert code == 0 and "LyCORIS LoRA" in stdout


# --- plan shows what a bake_lora step will bake --------------------------------------------------


def test_plan_lists_the_loras_of_a_bake_lora_step_among_its_inputs(tmp_path, bases, cli,
                                                                    monkeypatch):
    """plan said nothing of the LoRAs a bake_lora step bakes ("parameters: defaults"), nor
    counted them among the inputs and the bytes read."""
    from mergekit_sd.merge.plan import build_plan
    from mergekit_sd.recipe.loader import load_recipe

    character = write_lora(tmp_path / "character.safetensors", "kohya-sd1")
    style = write_lora(tmp_path / "style.safetensors", "loha-sd1")
    recipe = tmp_path / "bake.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  character: {character}\n"
        f"  style: {style}\nsteps:\n  - name: baked\n    method: bake_lora\n"
        "    inputs: [base]\n    loras:\n"
        "      - {model: character, strength: 0.8, te_strength: 0.5}\n"
        "      - {model: style, strength: 0.6, blocks: {IN*: 0.5, default: 0}}\n"
        f"output:\n  path: {tmp_path / 'out.safetensors'}\n")
    code, stdout, err = cli("plan", recipe, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    inputs = {i["name"]: i for i in doc["inputs"]}
    assert set(inputs) == {"base", "character", "style"}
    assert inputs["style"]["label"] == "LyCORIS LoHa for SD1.x"
    assert inputs["character"]["file_size"] == character.stat().st_size
    [step] = doc["steps"]
    assert step["loras"] == [
        {"model": "character", "strength": 0.8, "te_strength": 0.5, "blocks": None},
        {"model": "style", "strength": 0.6, "te_strength": None,
         "blocks": {"IN*": 0.5, "default": 0.0}}]
    monkeypatch.setenv("COLUMNS", "300")  # table cells on one line
    code, stdout, err = cli("plan", recipe)
    assert code == 0, err
    text = " ".join(stdout.replace("│", " ").split())
    assert "kohya LoRA for SD1.x" in text and "LyCORIS LoHa for SD1.x" in text
    assert "character: strength 0.8, te_strength 0.5; style: strength 0.6, blocks IN*=0.5 " \
           "default=0" in text, text
    plan = build_plan(load_recipe(recipe), existing="note")  # the LoRAs are read too
    assert plan.read_bytes == bases["sd1"].stat().st_size - read_header_size(bases["sd1"]) + \
        character.stat().st_size + style.stat().st_size


def read_header_size(path: Path) -> int:
    from mergekit_sd.io.header import read_header

    header = read_header(path)
    return header.file_size - header.data_bytes
