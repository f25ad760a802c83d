"""Merges end to end on tiny layout-faithful models: results equal the formulas on whole tensors,
parameters resolve per block/component/key, mismatches are handled, outputs are atomic."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from mergekit_sd.errors import Cancelled, UserError
from mergekit_sd.io.header import read_header
from mergekit_sd.merge.executor import run_merge
from mergekit_sd.merge.plan import VAE_SOURCE, build_plan
from mergekit_sd.merge.registry import get_method
from mergekit_sd.progress import CancelToken
from mergekit_sd.recipe.loader import parse_recipe
from mergekit_sd.testing import write_checkpoint

UNET_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
OUT_KEY = "model.diffusion_model.output_blocks.11.1.proj_out.weight"
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_checkpoint(root / f"{name}.safetensors", "sd1", seed=seed)
            for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4))}


def recipe(tmp_path: Path, models: dict[str, Path], steps: str, output: str = "",
           names=("a", "b", "c")) -> Path:
    lines = "\n".join(f"  {n}: {models[n]}" for n in names)
    text = (f"version: 1\nmodels:\n{lines}\nsteps:\n{textwrap.indent(textwrap.dedent(steps), '  ')}"
            f"output:\n  path: {tmp_path / 'out.safetensors'}\n  dtype: fp32\n"
            f"{textwrap.indent(textwrap.dedent(output), '  ')}")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def merge(path: Path, cancel: CancelToken | None = None) -> dict[str, torch.Tensor]:
    plan = build_plan(parse_recipe(path.read_text(), path), existing="replace")
    written = run_merge(plan, cancel=cancel)
    return {name: load_file(p) for name, p in written.items()}


def whole(models, name):
    return load_file(models[name])


FORMULAS = {
    "weighted_sum": ("[a, b]", "alpha: 0.3", lambda a, b, c: 0.7 * a + 0.3 * b),
    "add_difference": ("[a, b, c]", "alpha: 0.7", lambda a, b, c: a + 0.7 * (b - c)),
    "sum_twice": ("[a, b, c]", "{alpha: 0.3, beta: 0.6}",
                  lambda a, b, c: 0.4 * (0.7 * a + 0.3 * b) + 0.6 * c),
    "triple_sum": ("[a, b, c]", "{alpha: 0.2, beta: 0.5}",
                   lambda a, b, c: 0.3 * a + 0.2 * b + 0.5 * c),
    "train_difference": ("[a, b, c]", "alpha: 0.5", lambda a, b, c: a + 1.8 * 0.5 * (b - c) * (
        (b - a).abs() / ((b - c).abs() + (b - a).abs())).nan_to_num(0.0)),
    "copy": ("[b]", "{}", lambda a, b, c: b),
}


@pytest.mark.parametrize("method", list(FORMULAS))
def test_linear_methods_equal_their_formula_on_whole_tensors(tmp_path, models, method):
    inputs, params, formula = FORMULAS[method]
    params_line = f"params: {params}" if params.startswith("{") else f"params: {{{params}}}"
    out = merge(recipe(tmp_path, models, f"""
        - name: m
          method: {method}
          inputs: {inputs}
          {params_line}
        """))["m"]
    a, b, c = (whole(models, n) for n in "abc")
    for key in (UNET_KEY, TE_KEY, VAE_KEY):
        expected = formula(a[key], b[key], c[key])
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, inputs, params", [
    ("slerp", ["a", "b"], {"alpha": 0.3}),
    ("ties", ["a", "b", "c", "d"], {"alpha": 1.0, "density": 0.3}),
    ("ties", ["a", "b", "c"], {"dare": True, "dare_rate": 0.5, "seed": 7}),
    ("cosine_a", ["a", "b"], {"alpha": 0.2}),
    ("cosine_b", ["a", "b"], {"alpha": 0.2}),
])
def test_other_methods_equal_the_method_applied_to_whole_tensors(tmp_path, models, method,
                                                                 inputs, params):
    from mergekit_sd.merge.executor import _seed_for

    out = merge(recipe(tmp_path, models, f"""
        - name: m
          method: {method}
          inputs: {json.dumps(inputs)}
          params: {json.dumps(params)}
        """, names=tuple(inputs)))["m"]
    spec = get_method(method)
    tensors = {n: whole(models, n) for n in inputs}
    if spec.needs_stats:
        from mergekit_sd.merge.methods.supermerger import cosine_key_stat

        sims = [cosine_key_stat(tensors["a"][k].float(), tensors["b"][k].float())
                for k in tensors["a"] if tensors["a"][k].is_floating_point()]
        params = {**params, "stats": {"min": min(sims), "max": max(sims)}}
    for key in (UNET_KEY, TE_KEY):
        extra = {}
        if spec.stochastic:
            extra["generator"] = torch.Generator().manual_seed(
                _seed_for(params.get("seed", 0), key))
        expected = spec.func(*(tensors[n][key].float() for n in inputs), **params, **extra)
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)


def test_parameter_precedence_keys_components_blocks_default(tmp_path, models):
    out = merge(recipe(tmp_path, models, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params:
            alpha:
              default: 0.1
              blocks: {IN00-IN03: 0.4, OUT11: 0.9, BASE: 0.5}
              components: {vae: 0.0}
              keys: {"*proj_out*": 0.6}
        """))["m"]
    a, b = whole(models, "a"), whole(models, "b")

    def alpha_of(key):
        return ((out[key] - a[key]) / (b[key] - a[key])).median().item()

    assert alpha_of(UNET_KEY) == pytest.approx(0.4, abs=1e-4)  # IN01 by block range
    assert alpha_of(OUT_KEY) == pytest.approx(0.6, abs=1e-4)  # key pattern beats OUT11
    assert alpha_of("model.diffusion_model.output_blocks.11.1.norm.weight") == \
        pytest.approx(0.9, abs=1e-4)
    assert alpha_of(TE_KEY) == pytest.approx(0.5, abs=1e-4)  # BASE block
    assert torch.equal(out[VAE_KEY], a[VAE_KEY])  # component beats BASE
    assert alpha_of("model.diffusion_model.middle_block.1.proj_in.weight") == \
        pytest.approx(0.1, abs=1e-4)


def test_sweep_writes_every_candidate_in_one_run(tmp_path, models):
    out = merge(recipe(tmp_path, models, """
        - name: mix
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: [0.25, 0.75]}
        - name: final
          method: add_difference
          inputs: [mix, c, a]
          params: {alpha: 0.5}
        """))
    assert set(out) == {"mix@alpha=0.25", "mix@alpha=0.75"}
    assert (tmp_path / "out@alpha=0.25.safetensors").exists()
    a, b, c = (whole(models, n) for n in "abc")
    for alpha in (0.25, 0.75):
        mix = (1 - alpha) * a[UNET_KEY] + alpha * b[UNET_KEY]
        torch.testing.assert_close(out[f"mix@alpha={alpha:g}"][UNET_KEY],
                                   mix + 0.5 * (c[UNET_KEY] - a[UNET_KEY]))
    assert not list(tmp_path.glob("*mix*")), "intermediate steps are never written"


def test_inpainting_conv_in_merges_on_the_overlap_and_keys_only_in_one_are_kept(tmp_path):
    inpaint = write_checkpoint(tmp_path / "inpaint.safetensors", "sd1-inpainting", seed=5)
    plain = write_checkpoint(tmp_path / "plain.safetensors", "sd1", seed=6)
    path = recipe(tmp_path, {"a": inpaint, "b": plain}, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: 0.5}
        """, names=("a", "b"))
    plan = build_plan(parse_recipe(path.read_text(), path))
    assert any("overlapping slice" in note for note in plan.notes)
    out = merge(path)["m"]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    a, b = load_file(inpaint)[key], load_file(plain)[key]
    assert out[key].shape == a.shape and a.shape[1] == 9
    torch.testing.assert_close(out[key][:, :4], 0.5 * a[:, :4] + 0.5 * b)
    assert torch.equal(out[key][:, 4:], a[:, 4:])


def test_dtype_vae_bake_and_ema_drop(tmp_path, models):
    vae = write_checkpoint(tmp_path / "vae.safetensors", "vae-sd", seed=9)
    out_path = recipe(tmp_path, models, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: 0.5}
        """, output=f"vae: {vae}\n").read_text().replace("dtype: fp32", "dtype: fp8_e4m3fn")
    (tmp_path / "r2.yaml").write_text(out_path)
    out = merge(tmp_path / "r2.yaml")["m"]
    assert out[UNET_KEY].dtype == torch.float8_e4m3fn
    assert torch.equal(out[VAE_KEY].float(),
                       load_file(vae)["decoder.conv_in.weight"].to(torch.float8_e4m3fn).float())


def test_provenance_and_byte_exact_reproduction(tmp_path, models):
    path = recipe(tmp_path, models, """
        - name: m
          method: add_difference
          inputs: [a, b, c]
          params: {alpha: [0.5, 1.0]}
        """)
    result = run_cli("merge", path)
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "out@alpha=0.5.safetensors"
    meta = read_header(merged).metadata
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "m@alpha=0.5"
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["interp_method"] == "Add difference" and a1111["multiplier"] == 0.5
    assert {m["name"] for m in json.loads(meta["sd_merge_models"]).values()} == {
        "a.safetensors", "b.safetensors", "c.safetensors"}
    extracted = run_cli("recipe", "extract", merged, "-o", tmp_path / "again.yaml",
                        "--output-path", tmp_path / "again.safetensors")
    assert extracted.returncode == 0, extracted.stderr
    rerun = run_cli("merge", tmp_path / "again.yaml")
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == merged.read_bytes()


def test_cancel_leaves_nothing(tmp_path, models):
    path = recipe(tmp_path, models, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
        """)
    plan = build_plan(parse_recipe(path.read_text(), path))
    token = CancelToken()

    def cancel_midway(stage, done, total):
        if stage == "merging" and done > total // 2:
            token.cancel()

    with pytest.raises(Cancelled):
        run_merge(plan, progress=cancel_midway, cancel=token)
    assert list(tmp_path.glob("out*")) == []


def test_killed_merge_leaves_no_file_under_the_output_name(tmp_path):
    big = {n: write_checkpoint(tmp_path / f"{n}.safetensors", "sd1", size="full",
                               dtype="F16", fill="sparse") for n in "ab"}
    path = recipe(tmp_path, big, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
        """, names=("a", "b"))
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_sd.cli", "merge", str(path)],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "out.safetensors.partial"
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists(), "the merge should have been killed while writing"
    assert not (tmp_path / "out.safetensors").exists()


BAD_RECIPES = {
    "unknown method": ("method: weighted_som", "steps.0.method", "did you mean 'weighted_sum'"),
    "unknown field": ("parms: {}", "steps.0.parms", "did you mean 'params'"),
    "missing input": ("inputs: [a, nope]", "steps.0.inputs.1", "neither a model nor"),
    "wrong type": ("params: {alpha: high}", "steps.0.params.alpha", "alpha"),
    "bad block": ("params: {alpha: {blocks: {IN12: 0.5}}}", "steps.0.params.alpha.blocks.IN12",
                  "does not exist for SD1.x"),
    "unknown param": ("params: {alpah: 0.5}", "steps.0.params", "alpha"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipes_name_file_field_and_line(tmp_path, models, case):
    change, field, words = BAD_RECIPES[case]
    steps = {"method": "method: weighted_sum", "inputs": "inputs: [a, b]", "params": ""}
    key = change.split(":")[0]
    steps[key] = change
    body = "\n".join(f"  {v}" for v in steps.values() if v)
    path = recipe(tmp_path, models, f"- name: m\n{body}\n")
    result = run_cli("merge", path)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert str(path) in message and field in message and "line" in message, message
    assert words in message, message
    assert not list(tmp_path.glob("out*"))


def test_cycle_architecture_mix_and_overwriting_an_input_are_refused(tmp_path, models):
    cyc = recipe(tmp_path, models, "- name: x\n  method: copy\n  inputs: [y]\n"
                                   "- name: y\n  method: copy\n  inputs: [x]\n")
    assert "cycle" in run_cli("plan", cyc).stderr
    xl = write_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    mixed = recipe(tmp_path, {"a": models["a"], "b": xl}, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
        """, names=("a", "b"))
    result = run_cli("merge", mixed)
    assert result.returncode == 2 and "different architectures" in result.stderr
    same = recipe(tmp_path, models, "- name: m\n  method: copy\n  inputs: [a]\n")
    same.write_text(same.read_text().replace(str(tmp_path / "out.safetensors"),
                                             str(models["a"])))
    result = run_cli("merge", same)
    assert result.returncode == 2 and "overwrite the input" in result.stderr


def test_out_stands_in_for_a_missing_output_and_is_relative_to_the_current_folder(
        tmp_path, models):
    path = recipe(tmp_path, models, "- name: m\n  method: copy\n  inputs: [a]\n")
    path.write_text(path.read_text().split("output:")[0])  # a recipe with no output: section
    refused = run_cli("plan", path)
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.strip() == (
        f"error: {path}, line 1, output: is required but missing (give output: with its "
        "path, or pass --out FILE to plan or merge)")
    here = tmp_path / "cwd"
    here.mkdir()
    planned = run_cli("plan", path, "--out", "new/x.safetensors", cwd=here)
    assert planned.returncode == 0, planned.stderr
    assert "-> new/x.safetensors" in planned.stdout
    merged = run_cli("merge", path, "--out", "new/x.safetensors", cwd=here)
    assert merged.returncode == 0, merged.stderr
    assert torch.equal(load_file(here / "new" / "x.safetensors")[UNET_KEY],
                       load_file(models["a"])[UNET_KEY].half())  # folders are created,
    # and the output's other fields keep their defaults (fp16)


def test_set_override_and_plan_json(tmp_path, models):
    path = recipe(tmp_path, models, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: 0.5}
        """)
    result = run_cli("plan", path, "--json", "--set", "m.alpha=[0.1,0.2]")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan["candidates"]) == {"m@alpha=0.1", "m@alpha=0.2"}
    assert plan["architecture"] == "sd1" and plan["keys"]["merged"] > 1000
    assert plan["blocks"]["IN00"] > 0 and plan["estimated_peak_bytes"] > 0


def test_large_tensors_streamed_in_pieces_give_identical_bytes(tmp_path, models, monkeypatch):
    from mergekit_sd.merge import executor

    vae = write_checkpoint(tmp_path / "vae.safetensors", "vae-sd", seed=9)
    path = recipe(tmp_path, models, """
        - name: m
          method: add_difference
          inputs: [a, b, c]
          params: {alpha: 0.4}
        """, output=f"vae: {vae}\n")
    path.write_text(path.read_text().replace("dtype: fp32", "dtype: fp16"))
    merge(path)
    in_one_piece = (tmp_path / "out.safetensors").read_bytes()
    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 1000)
    plan = build_plan(parse_recipe(path.read_text(), path), existing="replace")
    items = executor.work_items(plan)
    assert any(not item.whole for item in items if item.task.merge)
    assert any(not item.whole for item in items if item.task.sources == (VAE_SOURCE,))
    merge(path)
    assert (tmp_path / "out.safetensors").read_bytes() == in_one_piece


def plan_of(path: Path):
    return build_plan(parse_recipe(path.read_text(), path))


@pytest.mark.parametrize("target", ["vae", "lora"])
def test_an_output_that_would_overwrite_the_vae_or_a_lora_is_refused(tmp_path, models, target):
    from mergekit_sd.testing import write_lora

    vae = write_checkpoint(tmp_path / "vae.safetensors", "vae-sd", seed=9)
    lora = write_lora(tmp_path / "lora.safetensors", "kohya-sd1", seed=30)
    path = recipe(tmp_path, {**models, "l": lora}, """
        - name: m
          method: bake_lora
          inputs: [a]
          loras: [{model: l}]
        """, output=f"vae: {vae}\n", names=("a", "l"))
    victim = {"vae": vae, "lora": lora}[target]
    path.write_text(path.read_text().replace(str(tmp_path / "out.safetensors"), str(victim)))
    before = victim.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input " + {"vae": "output.vae",
                                                                        "lora": "l"}[target]):
        plan_of(path)
    assert victim.read_bytes() == before


def test_the_plan_itself_refuses_an_output_it_cannot_write(tmp_path, models):
    """Not only the CLI: a library caller (a recipe run from the TUI) hears it before any
    work, too."""
    path = recipe(tmp_path, models, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
        """)
    a_file = tmp_path / "taken"
    a_file.write_bytes(b"keep")
    (tmp_path / "dir.safetensors").mkdir()
    for out, words in ((a_file / "x.safetensors", "is a file, not a folder"),
                       (tmp_path / "dir.safetensors", "is a directory")):
        with pytest.raises(UserError, match=words):
            build_plan(parse_recipe(path.read_text(), path), out=out)
    assert a_file.read_bytes() == b"keep"


@pytest.mark.parametrize(("variant", "component"), [("sd1-unet", "unet"),
                                                     ("flux-dev-transformer", "transformer")])
def test_components_apply_to_every_key_of_a_diffusion_model_saved_alone(tmp_path, variant,
                                                                       component):
    bare = {n: write_checkpoint(tmp_path / f"{n}.safetensors", variant, seed=seed)
            for n, seed in (("a", 7), ("b", 12))}
    out = merge(recipe(tmp_path, bare, f"""
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params: {{alpha: {{default: 0.5, components: {{{component}: 1.0}}}}}}
        """, names=("a", "b")))["m"]
    b = whole(bare, "b")
    floating = [k for k in b if b[k].is_floating_point()]
    assert floating and all(torch.equal(out[k], b[k].float()) for k in floating)


@pytest.mark.parametrize(("variant", "vae_variant", "words"), [
    ("sd1", "vae-flux", "VAE (16 latent channels), which does not fit the VAE (4 latent"),
    ("sd1-unet", "vae-sd", "has no VAE to replace"),
])
def test_a_vae_that_does_not_fit_the_inputs_is_refused(tmp_path, variant, vae_variant, words):
    inputs = {n: write_checkpoint(tmp_path / f"{n}.safetensors", variant, seed=seed)
              for n, seed in (("a", 1), ("b", 2))}
    vae = write_checkpoint(tmp_path / "vae.safetensors", vae_variant, seed=9)
    path = recipe(tmp_path, inputs, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
        """, output=f"vae: {vae}\n", names=("a", "b"))
    result = run_cli("merge", path)
    assert result.returncode == 2, result.stderr
    assert "output.vae" in result.stderr and words in result.stderr, result.stderr
    assert "\n" not in result.stderr.strip() and not list(tmp_path.glob("out*"))


def test_inputs_with_identical_bytes_merge_and_make_one_lineage_entry(tmp_path, models):
    import shutil

    shutil.copyfile(models["a"], tmp_path / "a_copy.safetensors")
    path = recipe(tmp_path, {**models, "base": tmp_path / "a_copy.safetensors",
                             "again": models["b"]}, """
        - name: m
          method: add_difference
          inputs: [a, b, base]
          params: {alpha: 0.5}
        - name: n
          method: weighted_sum
          inputs: [m, again]
        """, names=("a", "b", "base", "again"))
    out = merge(path)["n"]
    a, b = whole(models, "a")[UNET_KEY], whole(models, "b")[UNET_KEY]
    torch.testing.assert_close(out[UNET_KEY], 0.5 * (a + 0.5 * (b - a)) + 0.5 * b)
    lineage = json.loads(read_header(tmp_path / "out.safetensors").metadata["sd_merge_models"])
    assert len(lineage) == 2


def test_merging_a_merge_with_one_of_its_parents_keeps_one_entry_per_model(tmp_path, models):
    first = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                   names=("a", "b"))
    merge(first)
    (tmp_path / "out.safetensors").rename(tmp_path / "ab.safetensors")
    again = recipe(tmp_path, {**models, "ab": tmp_path / "ab.safetensors"},
                   "- name: m\n  method: weighted_sum\n  inputs: [ab, a]\n", names=("ab", "a"))
    merge(again)
    lineage = json.loads(read_header(tmp_path / "out.safetensors").metadata["sd_merge_models"])
    assert sorted(entry["name"] for entry in lineage.values()) == [
        "a.safetensors", "ab.safetensors", "b.safetensors"]


@pytest.mark.parametrize("damage", [{"sd_merge_recipe": "not json"},
                                    {"sd_merge_models": "[1, 2]"},
                                    {"sd_merge_models": '{"x": 1}'},
                                    {"sd_merge_models": "[" * 50000 + "]" * 50000}])
def test_an_input_with_damaged_merge_lineage_merges_without_it(tmp_path, models, damage):
    damaged = write_checkpoint(tmp_path / "damaged.safetensors", "sd1", seed=1, metadata=damage)
    path = recipe(tmp_path, {**models, "a": damaged}, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
        """, names=("a", "b"))
    out = merge(path)["m"]
    a, b = whole(models, "a")[UNET_KEY], whole(models, "b")[UNET_KEY]
    torch.testing.assert_close(out[UNET_KEY], 0.5 * a + 0.5 * b)
    lineage = json.loads(read_header(tmp_path / "out.safetensors").metadata["sd_merge_models"])
    assert sorted(entry["name"] for entry in lineage.values()) == ["b.safetensors",
                                                                   "damaged.safetensors"]


def test_a_regular_expression_key_pattern_must_match_the_full_key(tmp_path, models):
    out = merge(recipe(tmp_path, models, r"""
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params:
            alpha:
              default: 0.0
              keys: {"re:model\\.diffusion_model\\.input_blocks\\.1": 1.0,
                     're:model\.diffusion_model\.input_blocks\.2\..*': 1.0}
        """, names=("a", "b")))["m"]
    a = whole(models, "a")
    took_b = {".".join(k.split(".")[:4]) for k in a if not torch.equal(out[k], a[k].float())}
    assert took_b == {"model.diffusion_model.input_blocks.2"}


def test_a_sweep_of_a_step_the_output_does_not_use_names_no_file(tmp_path, models):
    out = merge(recipe(tmp_path, models, """
        - name: mix
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: [0.2, 0.4]}
        - name: alt
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: 0.5}
        """, output="step: alt\n", names=("a", "b")))
    assert set(out) == {"alt"}
    assert [p.name for p in tmp_path.glob("out*")] == ["out.safetensors"]


@pytest.mark.parametrize(("values", "words"), [
    ("[0.5, 0.5]", "the sweep values 0.5 and 0.5 give one candidate"),
    ("[1, 1.0]", "the sweep values 1 and 1.0 give one candidate"),
    ("[]", "a sweep needs at least one value"),
    ("{default: []}", "a sweep needs at least one value"),
])
def test_a_sweep_needs_values_that_each_name_a_candidate(tmp_path, models, values, words):
    path = recipe(tmp_path, models, f"""
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params: {{alpha: {values}}}
        """, names=("a", "b"))
    result = run_cli("merge", path)
    assert result.returncode == 2, result.stderr
    assert "steps.0.params.alpha" in result.stderr and words in result.stderr, result.stderr
    assert not list(tmp_path.glob("out*"))


def test_sweep_values_that_print_alike_at_six_digits_name_distinct_files(tmp_path, models):
    out = merge(recipe(tmp_path, models, """
        - name: m
          method: weighted_sum
          inputs: [a, b]
          params: {alpha: [0.1234561, 0.1234562, 0.25]}
        """, names=("a", "b")))
    assert set(out) == {"m@alpha=0.1234561", "m@alpha=0.1234562", "m@alpha=0.25"}


@pytest.mark.parametrize(("value", "words"), [
    ("[0.2", "'[0.2' is not a plain YAML value"),
    ("!!python/object:os.system x", "is not a plain YAML value"),
    ("{default: 0.2, bogus: 1}", "bogus: is not a field here (valid fields: default"),
    ("", "give a value after '='"),
    ("{default: 0.2, default: 0.4}", "'default' is given twice"),
])
def test_set_values_that_are_not_parameters_are_one_sentence(tmp_path, models, value, words):
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                  names=("a", "b"))
    result = run_cli("plan", path, "--set", f"m.alpha={value}")
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and f"--set 'm.alpha={value}'" in message, message
    assert words in message, message


@pytest.mark.parametrize("device", ["bogus", "mps", "meta", "cuda:x"])
def test_a_device_merges_cannot_use_is_one_sentence(tmp_path, models, device):
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                  names=("a", "b"))
    with pytest.raises(UserError, match=f"--device {device}: use cpu or cuda"):
        run_merge(plan_of(path), device=device)
    assert not list(tmp_path.glob("out*"))


def test_plan_refuses_cosine_on_an_earlier_step(tmp_path, models):
    path = recipe(tmp_path, models, """
        - name: mix
          method: weighted_sum
          inputs: [a, b]
        - name: cos
          method: cosine_a
          inputs: [mix, b]
        """, names=("a", "b"))
    with pytest.raises(UserError, match=r"steps\.1\.inputs: cosine_a needs models as inputs"):
        plan_of(path)


@pytest.mark.parametrize("where", ["model", "vae"])
@pytest.mark.parametrize(("damage", "problem"), [
    ("header-length", "is not a safetensors file (its first 8 bytes give a 1000000000-byte "),
    ("metadata", "has a __metadata__ entry that is not a map of strings to strings"),
], ids=["header-length", "metadata"])
def test_a_bad_input_file_is_named_before_its_problem(tmp_path, models, where, damage, problem):
    """The file's problem is quoted whole after its name, whatever word the problem starts
    with (it was once spliced into the sentence's first 'is ')."""
    bad = tmp_path / "bad.safetensors"
    if damage == "header-length":
        bad.write_bytes((10**9).to_bytes(8, "little") + b"{}" * 20)
    else:
        data = models["a"].read_bytes()
        size = int.from_bytes(data[:8], "little")
        doc = json.loads(data[8:8 + size])
        doc["__metadata__"] = {"n": 1}
        header = json.dumps(doc).encode()
        bad.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size:])
    if where == "model":
        path = recipe(tmp_path, {"a": bad, "b": models["b"]},
                      "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n", names=("a", "b"))
        field = "models.a"
    else:
        path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                      output=f"vae: {bad}\n", names=("a", "b"))
        field = "output.vae"
    with pytest.raises(UserError) as caught:
        plan_of(path)
    assert f"{field}: bad.safetensors: {problem}" in str(caught.value)


@pytest.mark.parametrize(("value", "words"), [
    ("m.alpah=0.3", "merge method 'weighted_sum' has no parameter 'alpah'; did you mean 'alpha'"),
    ("m.alpha=abc", "must be a number, not 'abc' (str)"),
    ("m.alpha=1e-3", "YAML reads that as text: write a point and a signed exponent"),
    ("m.alpha={blocks: {IN12: 0.5}}", "blocks.IN12: block 'IN12' does not exist for SD1.x"),
    ("m.alpha=[0.2, 0.2]", "the sweep values 0.2 and 0.2 give one candidate"),
])
def test_a_problem_with_a_set_value_names_the_set_not_a_recipe_line(tmp_path, models, value,
                                                                      words):
    """The recipe file has no line with the --set's value: the error points at the --set."""
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  "  params:\n    alpha: 0.5\n", names=("a", "b"))
    result = run_cli("plan", path, "--set", value)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"error: --set '{value}': "), message
    assert "\n" not in message and str(path) not in message and "line" not in message, message
    assert words in message, message


def test_set_reaches_a_step_whose_name_holds_dots(tmp_path, models):
    # step names may hold dots (v1.mix); --set split at the first one, so found no step 'v1'
    path = recipe(tmp_path, models, "- name: v1.mix\n  method: weighted_sum\n  inputs: [a, b]\n"
                  "  params:\n    alpha: 0.5\n", names=("a", "b"))
    result = run_cli("plan", path, "--json", "--set", "v1.mix.alpha=[0.1,0.2]")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["candidates"]) == {"v1.mix@alpha=0.1",
                                                            "v1.mix@alpha=0.2"}


def test_merge_refuses_an_existing_output_unless_overwrite(tmp_path, models):
    """As convert, bake and lora do: a file at the output path is replaced only on request,
    and every output of a sweep is checked before any work."""
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  "  params: {alpha: [0.2, 0.4, 0.6]}\n", names=("a", "b"))
    precious = tmp_path / "out@alpha=0.6.safetensors"
    precious.write_bytes(b"keep")
    result = run_cli("merge", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: {precious}: already exists; pass --overwrite to "
                                     "replace it")
    assert precious.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out@alpha=0.6.safetensors"]
    shown = run_cli("plan", path, "--json")
    assert shown.returncode == 0, shown.stderr
    assert (f"{precious}: already exists; merge replaces it only with --overwrite"
            in json.loads(shown.stdout)["notes"])
    replaced = run_cli("merge", path, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert load_file(precious)  # a model now
    again = run_cli("merge", path, "--out", tmp_path / "out.safetensors")
    assert again.returncode == 2
    assert "and 2 other outputs already exist; pass --overwrite to replace them" in again.stderr


def test_overwrite_never_replaces_an_input_even_through_a_hard_link(tmp_path, models):
    link = tmp_path / "a-link.safetensors"
    os.link(models["a"], link)
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                  names=("a", "b"))
    before = models["a"].read_bytes()
    result = run_cli("merge", path, "--out", link, "--overwrite")
    assert result.returncode == 2, result.stderr
    assert "would overwrite the input a" in result.stderr
    assert models["a"].read_bytes() == before


def test_a_merge_to_fp16_clamps_values_beyond_its_range_and_says_where(tmp_path):
    """fp16 is the default output dtype; bf16 inputs can hold values it cannot."""
    from safetensors.torch import save_file

    inputs = {}
    for name, seed, where, big in (("a", 1, 0, 1e5), ("b", 2, 1, -7e4)):
        path = write_checkpoint(tmp_path / f"{name}.safetensors", "sd1", seed=seed, dtype="BF16")
        tensors = load_file(path)
        tensors[UNET_KEY].view(-1)[where] = big
        save_file(tensors, path)
        inputs[name] = path
    path = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  "  params: {alpha: 0.25}\n", names=("a", "b"))
    path.write_text(path.read_text().replace("  dtype: fp32\n", ""))  # the default: fp16
    result = run_cli("merge", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "note: 1 value in 1 tensor lay beyond fp16's range (±65504) and was clamped to it "
        f"instead of becoming infinite: {UNET_KEY}")
    merged = load_file(tmp_path / "out.safetensors")
    assert merged[UNET_KEY].dtype == torch.float16
    assert torch.isfinite(torch.cat([t.float().view(-1) for t in merged.values()])).all()
    assert merged[UNET_KEY].view(-1)[0].item() == 65504.0


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_nan_and_infinity_a_merge_writes_are_named_with_the_input_holding_them(
        tmp_path, models, dtype):
    """One NaN blackens every image: the output's NaN and ±inf are said, with the input that
    holds them. An input's infinity stays infinite in fp16 (no clamp to 65504 said as one)."""
    from safetensors.torch import save_file

    tensors = load_file(models["b"])
    tensors[UNET_KEY].view(-1)[0] = float("nan")
    tensors[OUT_KEY].view(-1)[0] = float("inf")
    broken = {"a": models["a"], "b": tmp_path / "b.safetensors"}
    save_file(tensors, broken["b"])
    path = recipe(tmp_path, broken, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  "  params: {alpha: 0.25}\n", names=("a", "b"))
    path.write_text(path.read_text().replace("dtype: fp32", f"dtype: {dtype}"))
    result = run_cli("merge", path, "--json")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert notes == [f"1 NaN value and 1 infinite value written in 2 tensors (one such weight "
                     f"blackens every image): {UNET_KEY}, {OUT_KEY}; input b holds NaN or "
                     "infinity there"]
    merged = load_file(tmp_path / "out.safetensors")
    assert merged[UNET_KEY].view(-1)[0].isnan()
    assert merged[OUT_KEY].view(-1)[0].item() == math.inf


def test_a_merge_keeps_the_kind_of_model_its_inputs_agree_on(tmp_path):
    """Only metadata says a model is v-prediction: a merge of two such models is one too.
    Facts about the input files themselves (title, author) are not carried."""
    facts = {"modelspec.prediction_type": "v", "modelspec.resolution": "1024x1024"}
    inputs = {name: write_checkpoint(tmp_path / f"{name}.safetensors", "sd1", seed=seed,
                                     metadata={**facts, "modelspec.title": name,
                                               "modelspec.author": f"author {name}"})
              for name, seed in (("a", 1), ("b", 2))}
    inputs["c"] = write_checkpoint(tmp_path / "c.safetensors", "sd1", seed=3,
                                   metadata={"modelspec.resolution": "512x512"})
    path = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                  names=("a", "b"))
    meta = read_header(next(iter(run_merge(plan_of(path)).values()))).metadata
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.title"] == "m" and "modelspec.author" not in meta
    inspected = run_cli("inspect", "-v", tmp_path / "out.safetensors")
    assert "v (modelspec.prediction_type)" in inspected.stdout, inspected.stdout
    mixed = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, c]\n",
                   names=("a", "c"))
    plan = build_plan(parse_recipe(mixed.read_text(), mixed), existing="replace")
    assert ("the inputs disagree on modelspec.prediction_type (a: v, c: not set), so the "
            "output does not carry it") in plan.notes
    assert ("the inputs disagree on modelspec.resolution (a: 1024x1024, c: 512x512), so the "
            "output does not carry it") in plan.notes
    meta = read_header(next(iter(run_merge(plan).values()))).metadata
    assert "modelspec.prediction_type" not in meta and "modelspec.resolution" not in meta


@pytest.mark.parametrize("name", ["text_encoder_2", "text_encoder_3"])
def test_flux_t5_is_text_encoder_2_as_diffusers_names_it(tmp_path, name):
    """FLUX's second text encoder, T5, is diffusers' text_encoder_2; text_encoder_3, what
    recipes called it before (and merged files still store), keeps working."""
    inputs = {n: write_checkpoint(tmp_path / f"{n}.safetensors", "flux-dev", seed=seed)
              for n, seed in (("a", 1), ("b", 2))}
    path = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  f"  params: {{alpha: {{default: 0.5, components: {{{name}: 0}}}}}}\n",
                  names=("a", "b"))
    out = merge(path)["m"]
    a, b = whole(inputs, "a"), whole(inputs, "b")
    t5 = [k for k in out if k.startswith("text_encoders.t5xxl.")]
    clip = [k for k in out if k.startswith("text_encoders.clip_l.")]
    assert t5 and clip
    for key in t5:
        torch.testing.assert_close(out[key], a[key])
    for key in clip:
        torch.testing.assert_close(out[key], 0.5 * a[key] + 0.5 * b[key])


@pytest.mark.parametrize(("variant", "name", "valid"), [
    ("sd1", "text_encoder_2", "text_encoder_1 (CLIP-L), vae"),
    ("sdxl", "text_encoder_3", "text_encoder_1 (CLIP-L), text_encoder_2 (CLIP-G), vae"),
    ("flux-dev", "text_encodr", "text_encoder_1 (CLIP-L), text_encoder_2 (T5-XXL), vae"),
])
def test_a_component_the_architecture_lacks_is_refused_with_its_valid_names(tmp_path, variant,
                                                                           name, valid):
    inputs = {n: write_checkpoint(tmp_path / f"{n}.safetensors", variant, seed=seed)
              for n, seed in (("a", 1), ("b", 2))}
    path = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  f"  params: {{alpha: {{components: {{{name}: 0}}}}}}\n", names=("a", "b"))
    with pytest.raises(UserError) as caught:
        plan_of(path)
    message = str(caught.value)
    assert f"line 9, steps.0.params.alpha.components.{name}: " in message, message
    assert f"has no component {name!r}; use one of diffusion_model, " in message, message
    assert valid in message, message


def test_values_that_select_no_key_are_noted_by_plan_and_warned_by_merge(tmp_path):
    """A mistyped key pattern, or a component the files lack (a UNet saved alone has no VAE),
    would drop its value unsaid."""
    inputs = {n: write_checkpoint(tmp_path / f"{n}.safetensors", "sd1-unet", seed=seed)
              for n, seed in (("a", 1), ("b", 2))}
    path = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  "  params:\n    alpha:\n      default: 0.5\n"
                  "      components: {vae: 0, unet: 0.4}\n"
                  "      keys: {'*atn2*': 0.77, '*attn2*': 0.2}\n", names=("a", "b"))
    unused = [f"{path}, line 12, steps.0.params.alpha.components.vae: selects no key of the "
              "inputs, so its value is never used",
              f"{path}, line 13, steps.0.params.alpha.keys.*atn2*: selects no key of the "
              "inputs, so its value is never used"]
    shown = run_cli("plan", path, "--json")
    assert shown.returncode == 0, shown.stderr
    notes = json.loads(shown.stdout)["notes"]
    assert [n for n in notes if "selects no key" in n] == unused
    merged = run_cli("merge", path)
    assert merged.returncode == 0, merged.stderr
    assert merged.stderr.strip().splitlines() == [f"warning: {u}" for u in unused]


# --- block values as supermerger writes them: a comma string, a list, a preset ---------------

SD1_BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00",
              *(f"OUT{i:02d}" for i in range(12))]
SD1_SHORT = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             *(f"OUT{i:02d}" for i in range(3, 12))]
VALUES_26 = [round(0.04 * i, 2) for i in range(26)]
VALUES_17 = [round(1 - 0.05 * i, 2) for i in range(17)]


@pytest.mark.parametrize(("blocks", "default", "as_map"), [
    (f"'{','.join(map(str, VALUES_26))}'", None, dict(zip(SD1_BLOCKS, VALUES_26, strict=True))),
    (str(VALUES_26), None, dict(zip(SD1_BLOCKS, VALUES_26, strict=True))),
    # LoRA Block Weight's 17: the blocks it leaves out take the default
    (f"'{','.join(map(str, VALUES_17))}'", 0.3, dict(zip(SD1_SHORT, VALUES_17, strict=True))),
    ("out", None, {b: float(b == "BASE" or b.startswith("OUT")) for b in SD1_BLOCKS}),
], ids=["comma-string", "list", "short-17", "preset"])
def test_block_values_in_supermerger_forms_merge_as_the_block_map_does(tmp_path, models, blocks,
                                                                       default, as_map):
    def merged(spec: str) -> dict:
        extra = "" if default is None else f"default: {default}, "
        return merge(recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n"
                            f"  inputs: [a, b]\n  params: {{alpha: {{{extra}blocks: {spec}}}}}\n",
                            names=("a", "b")))["m"]

    listed = merged(blocks)
    mapped = merged("{" + ", ".join(f"{b}: {v}" for b, v in as_map.items()) + "}")
    assert listed.keys() == mapped.keys()
    for key in listed:
        assert torch.equal(listed[key], mapped[key]), key
    a, b = whole(models, "a"), whole(models, "b")
    alpha = ((listed[UNET_KEY] - a[UNET_KEY]) / (b[UNET_KEY] - a[UNET_KEY])).median().item()
    assert alpha == pytest.approx(as_map["IN01"], abs=1e-4)


@pytest.mark.parametrize(("blocks", "words"), [
    ("'0,1,1'", "steps.0.params.alpha.blocks: 3 block values given; SD1.x takes 26 or 17 "
                "(see `mergekit-sd blocks sd1`)"),
    (str([0.5] * 20), "steps.0.params.alpha.blocks: 20 block values given; SD1.x takes 26 or 17"),
    ("'0,1,nan'", "steps.0.params.alpha.blocks: 'nan' in '0,1,nan' is not a finite number"),
    ("[0, 1, .inf]", "steps.0.params.alpha.blocks.2: inf is not a finite number; give each "
                     "block a number, such as 0.5"),
    ("[0, 1, x]", "steps.0.params.alpha.blocks.2: 'x' is not a finite number; give each "
                  "block a number, such as 0.5"),
    ("double", "steps.0.params.alpha.blocks: 'double': no block of SD1.x is in this preset"),
    ("0.5", "steps.0.params.alpha.blocks: give blocks as {BLOCK or RANGE: value} (e.g. "
            "{IN00-IN05: 0.2, M00: 1}), as one value per block in order, a list or a "
            "comma-separated string as supermerger writes them (26 or 17 values for SD1"),
    ("outt", "steps.0.params.alpha.blocks: 'outt' is none of the forms blocks takes; give "
             "blocks as {BLOCK or RANGE: value}"),
    ("IN00-IN05", "steps.0.params.alpha.blocks: 'IN00-IN05' names blocks but gives them no "
                  "value; write {IN00-IN05: VALUE}"),
], ids=["short", "sdxl-length", "nan-text", "inf-list", "text-in-list", "flux-preset", "number",
        "typo", "range-alone"])
def test_block_values_that_fit_no_form_say_which_forms_fit(tmp_path, models, blocks, words):
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  f"  params: {{alpha: {{blocks: {blocks}}}}}\n", names=("a", "b"))
    with pytest.raises(UserError) as caught:
        build_plan(parse_recipe(path.read_text(), path), existing="replace")
    message = str(caught.value)
    assert message.startswith(f"{path}, line 9, "), message
    assert words in message and "\n" not in message, message
    assert "valid dictionary" not in message, message


def test_a_block_list_takes_numbers_yaml_reads_as_text(tmp_path, models):
    # YAML reads 1e-3 (no dot) as text; a block list takes it as the comma string form does
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  f"  params: {{alpha: {{blocks: [{', '.join(['1e-3'] * 26)}]}}}}\n",
                  names=("a", "b"))
    plan = build_plan(parse_recipe(path.read_text(), path), existing="replace")
    assert set(plan.steps[0].params["m"]["alpha"].by_block.values()) == {0.001}


def test_a_block_string_pasted_as_the_parameter_itself_says_where_it_goes(tmp_path, models):
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n"
                  f"  params: {{alpha: '{','.join(map(str, VALUES_26))}'}}\n", names=("a", "b"))
    with pytest.raises(UserError) as caught:
        build_plan(parse_recipe(path.read_text(), path), existing="replace")
    assert str(caught.value).endswith("(str); per-block values go under blocks, as in alpha: "
                                      '{blocks: "0,1,..."} or {default: 0.5, blocks: out}')


def test_a_block_string_given_by_set_is_checked_as_the_recipe_s_own(tmp_path, models):
    path = recipe(tmp_path, models, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                  names=("a", "b"))
    assignment = "m.alpha={blocks: '0,1'}"
    result = run_cli("plan", path, "--set", assignment)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: --set {assignment!r}: blocks: 2 block values "
                                     "given; SD1.x takes 26 or 17 (see `mergekit-sd blocks "
                                     "sd1`)")


def test_block_lists_strings_and_presets_survive_extract_and_rerun_byte_for_byte(tmp_path,
                                                                              models):
    path = recipe(tmp_path, models, f"""
        - name: m
          method: sum_twice
          inputs: [a, b, c]
          params:
            alpha: {{blocks: '{','.join(map(str, VALUES_26))}'}}
            beta: {{default: 0.2, blocks: {VALUES_17}}}
        - name: final
          method: weighted_sum
          inputs: [m, a]
          params: {{alpha: {{blocks: mid-out}}}}
        """)
    result = run_cli("merge", path)
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "out.safetensors"
    stored = json.loads(read_header(merged).metadata["mergekit_sd.recipe"])
    assert stored["steps"][0]["params"]["alpha"] == {"blocks": ",".join(map(str, VALUES_26))}
    assert stored["steps"][0]["params"]["beta"]["blocks"] == VALUES_17
    assert stored["steps"][1]["params"]["alpha"] == {"blocks": "mid-out"}
    extracted = run_cli("recipe", "extract", merged, "-o", tmp_path / "again.yaml",
                        "--output-path", tmp_path / "again.safetensors")
    assert extracted.returncode == 0, extracted.stderr
    rerun = run_cli("merge", tmp_path / "again.yaml")
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == merged.read_bytes()


# --- merge says what plan notes ----------------------------------------------------------------

def test_merge_says_what_plan_notes_on_stderr_and_in_its_json(tmp_path):
    """An epsilon model merged with a v-prediction one, and a block only one input has: plan
    notes both, and a user who runs only merge must learn of them too."""
    from safetensors.torch import save_file

    a = write_checkpoint(tmp_path / "eps.safetensors", "sd1", seed=1,
                         metadata={"modelspec.prediction_type": "epsilon"})
    b = write_checkpoint(tmp_path / "v.safetensors", "sd1", seed=2,
                         metadata={"modelspec.prediction_type": "v"})
    tensors = load_file(b)
    save_file({k: v for k, v in tensors.items() if "output_blocks.11." not in k}, b,
              metadata={"modelspec.prediction_type": "v"})
    path = recipe(tmp_path, {"a": a, "b": b}, "- name: m\n  method: weighted_sum\n"
                  "  inputs: [a, b]\n  params: {alpha: 0.5}\n", names=("a", "b"))
    planned = run_cli("plan", path, "--json")
    assert planned.returncode == 0, planned.stderr
    notes = json.loads(planned.stdout)["notes"]
    assert any(n.startswith("the inputs disagree on modelspec.prediction_type (a: epsilon, "
                            "b: v)") and "rarely samples well" in n for n in notes), notes
    assert any(n.startswith("38 keys are in only some inputs") for n in notes), notes
    merged = run_cli("merge", path, "--json")
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout) == {"written": {"m": str(tmp_path / "out.safetensors")},
                                         "notes": notes}  # stdout stays one JSON document
    assert merged.stderr.strip().splitlines() == [f"note: {n}" for n in notes]
    again = run_cli("merge", path, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines()[-len(notes):] == [f"note: {n}" for n in notes]


def test_an_inpainting_model_behind_a_normal_one_is_refused_as_a1111_and_supermerger_do(
        tmp_path):
    """The output takes the first input's shapes: behind a normal A, B's extra conv_in
    channels would be dropped and the result could not inpaint."""
    inputs = {"a": write_checkpoint(tmp_path / "plain.safetensors", "sd1", seed=1),
              "b": write_checkpoint(tmp_path / "inpaint.safetensors", "sd1-inpainting", seed=2)}
    path = recipe(tmp_path, inputs, "- name: m\n  method: weighted_sum\n  inputs: [a, b]\n",
                  names=("a", "b"))
    result = run_cli("merge", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: {path}, line 4, models.b: inpaint.safetensors is an inpainting model but "
        "plain.safetensors (a), whose shapes the output takes, is a normal model: its extra "
        "input channels would be dropped; list b first (as A), as AUTOMATIC1111 and "
        "supermerger require")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_shape_clash_that_drops_part_of_a_later_input_says_so(tmp_path):
    """Extended token embeddings in B: the output keeps A's rows, and B's extra ones are gone."""
    from safetensors.torch import save_file

    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", seed=1)
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", seed=2)
    tensors = load_file(b)
    tensors[key] = torch.cat([tensors[key], torch.ones(3, tensors[key].shape[1])])
    save_file(tensors, b)
    path = recipe(tmp_path, {"a": a, "b": b}, "- name: m\n  method: weighted_sum\n"
                  "  inputs: [a, b]\n", names=("a", "b"))
    plan = build_plan(parse_recipe(path.read_text(), path))
    clash = next(n for n in plan.notes if n.startswith(key))
    assert clash.endswith("merged on the overlapping slice in the shape of a, which the output "
                          "takes; what b holds beyond it is dropped"), clash
