"""What a merged file says about itself describes that file: AUTOMATIC1111's slots follow the
final step's inputs, its inpainting flag the output's own conv_in, and a stochastic step
records the seed it ran with."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from mergekit_sd.io.header import read_header
from mergekit_sd.merge.executor import run_merge
from mergekit_sd.merge.plan import build_plan
from mergekit_sd.recipe.loader import parse_recipe
from mergekit_sd.testing import write_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {name: write_checkpoint(root / f"{name}.safetensors", "sd1", seed=seed)
            for name, seed in (("base", 1), ("anime", 2), ("photo", 3))}
    made["inpaint"] = write_checkpoint(root / "inpaint.safetensors", "sd1-inpainting", seed=4)
    return made


def merged_metadata(tmp_path: Path, models: dict[str, Path], steps: str) -> dict[str, str]:
    lines = "\n".join(f"  {name}: {path}" for name, path in models.items())
    path = tmp_path / "recipe.yaml"
    path.write_text(f"version: 1\nmodels:\n{lines}\nsteps:\n"
                    f"{textwrap.indent(textwrap.dedent(steps), '  ')}"
                    f"output: {{path: {tmp_path / 'out.safetensors'}, dtype: fp32}}\n")
    written = run_merge(build_plan(parse_recipe(path.read_text(), path)))
    (out,) = written.values()
    return read_header(out).metadata


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a1111_slots_follow_the_final_steps_inputs_and_an_intermediate_has_no_hash(
        tmp_path, models):
    meta = merged_metadata(tmp_path, models, """
        - {name: mix, method: weighted_sum, inputs: [base, anime], params: {alpha: 0.4}}
        - {name: final, method: add_difference, inputs: [mix, photo, base], params: {alpha: 0.3}}
        """)
    a1111 = json.loads(meta["sd_merge_recipe"])
    # A is the intermediate `mix`: no file, so no hash, and named as the step; B and C stay
    assert a1111["primary_model_hash"] is None
    assert a1111["primary_model_step"] == "mix"
    assert a1111["secondary_model_hash"] == sha256(models["photo"])
    assert a1111["tertiary_model_hash"] == sha256(models["base"])
    assert "secondary_model_step" not in a1111 and "tertiary_model_step" not in a1111
    assert (a1111["interp_method"], a1111["multiplier"]) == ("Add difference", 0.3)


def test_a1111_slots_of_a_one_step_merge_are_its_models(tmp_path, models):
    meta = merged_metadata(tmp_path, models, """
        - {name: m, method: weighted_sum, inputs: [photo, anime], params: {alpha: 0.4}}
        """)
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["primary_model_hash"] == sha256(models["photo"])
    assert a1111["secondary_model_hash"] == sha256(models["anime"])
    assert a1111["tertiary_model_hash"] is None
    assert not [key for key in a1111 if key.endswith("_model_step")]


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def with_conv_in_channels(source: Path, path: Path, channels: int) -> Path:
    """A copy of the SD1 model `source` whose conv_in takes `channels` inputs."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(source)
    conv_in = tensors[CONV_IN]
    tensors[CONV_IN] = torch.cat([conv_in, conv_in[:, :1].repeat(1, channels - 4, 1, 1)], 1)
    save_file(tensors, path)
    return path


# (a normal model first and an inpainting one behind it is refused: tests/test_merge.py)
@pytest.mark.parametrize(("first", "second", "inpainting"), [
    ("inpaint", "anime", True), ("anime", "photo", False)])
def test_is_inpainting_describes_the_output_not_the_inputs(tmp_path, models, first, second,
                                                           inpainting):
    meta = merged_metadata(tmp_path, models, f"""
        - {{name: m, method: weighted_sum, inputs: [{first}, {second}], params: {{alpha: 0.5}}}}
        """)
    conv_in = read_header(tmp_path / "out.safetensors").tensors[CONV_IN].shape
    assert conv_in[1] == (9 if inpainting else 4)
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["is_inpainting"] is inpainting
    assert a1111["is_instruct_pix2pix"] is False


def test_is_instruct_pix2pix_describes_the_output(tmp_path, models):
    pix2pix = with_conv_in_channels(models["photo"], tmp_path / "pix2pix.safetensors", 8)
    meta = merged_metadata(tmp_path, {"p": pix2pix, "anime": models["anime"]}, """
        - {name: m, method: weighted_sum, inputs: [p, anime], params: {alpha: 0.5}}
        """)
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert (a1111["is_instruct_pix2pix"], a1111["is_inpainting"]) == (True, False)


@pytest.mark.parametrize(("params", "recorded"), [
    ("{dare: true}", {"dare": True, "seed": 0, "dare_rate": 0.9}),
    ("{dare: true, seed: 7}", {"dare": True, "seed": 7, "dare_rate": 0.9}),
    ("{dare: true, dare_rate: 0.5}", {"dare": True, "seed": 0, "dare_rate": 0.5}),
    # TIES without DARE draws nothing: no seed to record
    ("{density: 0.5}", {"density": 0.5}),
    ("{dare: false}", {"dare": False})])
def test_a_stochastic_step_records_the_seed_and_rate_it_drew_with(tmp_path, models, params,
                                                                 recorded):
    steps = f"- {{name: t, method: ties, inputs: [base, anime, photo], params: {params}}}\n"
    meta = merged_metadata(tmp_path, models, steps)
    (step,) = json.loads(meta["mergekit_sd.recipe"])["steps"]
    assert step["params"] == recorded


def test_plan_shows_the_seed_a_stochastic_step_will_draw_with(tmp_path, models):
    from mergekit_sd.merge.report import plan_as_dict

    path = tmp_path / "recipe.yaml"
    path.write_text(f"version: 1\nmodels: {{base: {models['base']}, a: {models['anime']}}}\n"
                    "steps: [{name: t, method: ties, inputs: [base, a], params: {dare: true}}]\n"
                    f"output: {{path: {tmp_path / 'out.safetensors'}}}\n")
    (step,) = plan_as_dict(build_plan(parse_recipe(path.read_text(), path)))["steps"]
    assert step["params"] == {"t": {"dare": "True", "seed": "0 (default)",
                                    "dare_rate": "0.9 (default)"}}


def test_the_extracted_recipe_of_a_dare_merge_names_its_seed_and_gives_the_same_bytes(
        tmp_path, models):
    from conftest import run_cli

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodels: {{base: {models['base']}, a: {models['anime']}, "
        f"b: {models['photo']}}}\n"
        "steps: [{name: t, method: ties, inputs: [base, a, b], params: {dare: true}}]\n"
        f"output: {{path: {tmp_path / 'out.safetensors'}}}\n")
    assert run_cli("merge", recipe).returncode == 0
    extracted = run_cli("recipe", "extract", tmp_path / "out.safetensors", "-o",
                        tmp_path / "again.yaml", "--output-path", "again.safetensors")
    assert extracted.returncode == 0, extracted.stderr
    assert "    dare: true\n    dare_rate: 0.9\n    seed: 0\n" in (tmp_path /
                                                                 "again.yaml").read_text()
    assert run_cli("merge", tmp_path / "again.yaml").returncode == 0
    assert ((tmp_path / "again.safetensors").read_bytes()
            == (tmp_path / "out.safetensors").read_bytes())


def test_a_stochastic_method_must_name_its_seed_among_its_draws():
    from mergekit_sd.merge.registry import merge_method

    def drop(a, *, seed: int = 0, rate: float = 0.5, generator=None):
        """a"""
        return a

    with pytest.raises(ValueError, match="must name its parameters, seed too"):
        merge_method("drop-test", inputs=("a",), stochastic=True, draws=("rate",))(drop)
    with pytest.raises(ValueError, match="is no bool parameter"):
        merge_method("drop-test", inputs=("a",), stochastic=True, drawn_when="rate")(drop)
