"""NaN and infinity never leave a bake, a LoRA merge or an extraction silently.

A LoRA tensor holding NaN or infinity would spread them over every weight it touches (a model
that renders black images): the LoRA is refused, naming the tensor. A bake whose result lies
beyond the output dtype's range (fp16 above 65504) is clamped to it, as every narrowing cast of
the project does (`io.saturate`), with a note naming the tensors; a result beyond float32's own
range, where the arithmetic runs, is refused. Each case is checked on every route a weight can
take through the bake: in place in fp32, in place in fp16 (factors of the weight's dtype), in
blocks of rows on several workers, and through an fp32 work copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_lora_bake as lora_bake
import torch
from safetensors.torch import load_file, save_file
from test_lora_bake import UNET, assert_one_sentence, expected_bake, scaled_lora

from mergekit_sd.errors import UserError
from mergekit_sd.lora import bake_run
from mergekit_sd.lora.bake import LoraUse, apply_loras, delta_bound, plan_bake
from mergekit_sd.lora.bake_run import run_bake
from mergekit_sd.lora.combine import merge_loras
from mergekit_sd.lora.extract import extract_lora
from mergekit_sd.testing import write_checkpoint, write_lora

bases, cli, one_torch_thread = lora_bake.bases, lora_bake.cli, lora_bake.one_torch_thread

FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
FC1_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
PROJ_IN_KEY = UNET + "input_blocks.1.1.proj_in.weight"


@pytest.fixture(params=["whole", "rows"])
def row_blocks(request, monkeypatch):
    """The bake as it runs on tiny weights (one task per weight), and as on large ones: in
    blocks of rows, one task each (the blocks shrunk to a few rows)."""
    if request.param == "rows":
        monkeypatch.setattr(bake_run, "ROW_BLOCK_ELEMENTS", 64)
    return request.param


def with_nan(path: Path, key: str, value: float = float("nan")) -> Path:
    tensors = load_file(path)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def f16_base(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("f16") / "sd1_f16.safetensors", "sd1",
                            dtype="F16")


@pytest.mark.parametrize(("base_dtype", "lora_dtype"), [("F32", "F16"), ("F16", "F16"),
                                                       ("F16", "F32")],
                         ids=["fp32-in-place", "fp16-in-place", "fp32-work-copy"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_lora_tensor_holding_nan_or_inf_is_refused_naming_it(tmp_path, bases, f16_base, cli,
                                                                row_blocks, base_dtype,
                                                                lora_dtype, value):
    base = bases["sd1"] if base_dtype == "F32" else f16_base
    lora = with_nan(write_lora(tmp_path / "l.safetensors", "kohya-sd1", dtype=lora_dtype),
                    f"{FC1}.lora_up.weight", value)
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("bake", base, lora, "-o", out), 2)
    assert f"l.safetensors: its tensor {FC1}.lora_up.weight holds NaN or infinite values" \
        in cli.last_err
    assert not out.exists() and list(tmp_path.glob("*.partial")) == []


def test_a_lora_alpha_holding_nan_is_refused_naming_it(tmp_path, bases, cli):
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    tensors = load_file(lora)
    tensors[f"{FC1}.alpha"] = torch.tensor(float("nan"))
    save_file(tensors, lora)
    assert_one_sentence(*cli("bake", bases["sd1"], lora, "-o", tmp_path / "o.safetensors"), 2)
    assert f"its tensor {FC1}.alpha holds NaN" in cli.last_err


def test_a_recipe_bake_refuses_a_lora_holding_nan(tmp_path, bases, cli):
    lora = with_nan(write_lora(tmp_path / "l.safetensors", "kohya-sd1"), f"{FC1}.lora_down.weight")
    recipe = tmp_path / "bake.yaml"
    out = tmp_path / "out.safetensors"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  l: {lora}\nsteps:\n"
        "  - name: baked\n    method: bake_lora\n    inputs: [base]\n    loras:\n"
        f"      - model: l\noutput:\n  path: {out}\n")
    assert_one_sentence(*cli("merge", recipe), 2)
    assert f"its tensor {FC1}.lora_down.weight holds NaN" in cli.last_err
    assert not out.exists()


@pytest.mark.parametrize("lora_dtype", ["F16", "F32"], ids=["fp16-in-place", "fp32-work-copy"])
def test_a_bake_beyond_fp16_is_clamped_to_its_range_with_a_note(tmp_path, f16_base, cli,
                                                                  row_blocks, lora_dtype):
    """Strength 1e9 on an fp16 checkpoint: every changed weight went infinite. The result is
    the fp32 bake clamped to ±65504, the nearest fp16 holds, as merge and convert clamp."""
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", dtype=lora_dtype)
    out = tmp_path / "out.safetensors"
    code, _, err = cli("bake", f16_base, f"{lora}:1e9", "-o", out)
    assert code == 0, err
    assert "lay beyond fp16's range (±65504) and were clamped to it" in err
    baked, base = load_file(out), load_file(f16_base)
    assert all(bool(torch.isfinite(v).all()) for v in baked.values())
    expected = expected_bake(base, lora, "kohya-sd1", 1e9)
    for key in (FC1_KEY, PROJ_IN_KEY):
        clamped = expected[key].clamp(-65504, 65504)
        assert bool((clamped.abs() == 65504).any()), "the test must reach the limit"
        assert torch.allclose(baked[key].float(), clamped, rtol=1e-3, atol=0), key


def test_a_bake_cast_to_fp16_is_clamped_to_its_range_with_a_note(tmp_path, bases, cli):
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    out = tmp_path / "out.safetensors"
    code, _, err = cli("bake", bases["sd1"], f"{lora}:1e9", "--dtype", "fp16", "-o", out)
    assert code == 0, err
    assert "were clamped to it instead of becoming infinite" in err and FC1_KEY in err
    baked = load_file(out)
    assert baked[FC1_KEY].dtype == torch.float16
    assert all(bool(torch.isfinite(v).all()) for v in baked.values())
    assert float(baked[FC1_KEY].abs().max()) == 65504


def test_a_bake_beyond_float32_is_refused(tmp_path, bases, cli, row_blocks):
    lora = scaled_lora(write_lora(tmp_path / "l.safetensors", "kohya-sd1", dtype="F32"), 1e3)
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("bake", bases["sd1"], f"{lora}:3e38", "-o", out), 2)
    assert "beyond float32's range" in cli.last_err and not out.exists()


def base_with(tmp_path, bases, key: str, value: float, everywhere: bool = False) -> Path:
    base = tmp_path / "base.safetensors"
    tensors = load_file(bases["sd1"])
    tensors[key] = tensors[key].clone()
    if everywhere:
        tensors[key].fill_(value)
    else:
        tensors[key][0, 0] = value
    save_file({k: v.half() if k == key else v for k, v in tensors.items()}
              if everywhere else tensors, base)
    return base


def test_a_base_weight_holding_nan_where_a_lora_lands_is_refused_when_it_is_read(
        tmp_path, bases, cli, row_blocks):
    """NaN already in the base: where the LoRAs' deltas are large enough that the baked weight
    is read (`delta_bound` at `SAFE_DELTA` or more), the bake says so and names the weight;
    where they are small, the weight is not read and its NaN stays, as in every weight no LoRA
    touches (a strength-0 LoRA leaves it byte for byte)."""
    base = base_with(tmp_path, bases, FC1_KEY, float("nan"))
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    assert_one_sentence(*cli("bake", base, f"{lora}:1e6", "-o", tmp_path / "o.safetensors"), 2)
    assert f"{FC1_KEY}: the baked weight holds NaN" in cli.last_err
    code, _, err = cli("bake", base, f"{lora}:0.01", "-o", tmp_path / "small.safetensors")
    assert code == 0, err
    assert torch.isnan(load_file(tmp_path / "small.safetensors")[FC1_KEY][0, 0])
    plan = plan_bake(base, [LoraUse("l", lora, 0.0)], tmp_path / "zero.safetensors")
    assert torch.isnan(load_file(run_bake(plan))[FC1_KEY][0, 0])  # strength 0: not touched


def test_a_delta_below_the_safe_bound_keeps_a_weight_at_fp16s_limit_finite(
        tmp_path, bases, cli, row_blocks):
    """The weight is not read when `delta_bound` is below `SAFE_DELTA`: that is safe even for
    a weight whose every value is fp16's largest, 65504 (a LoRA scaled so that its bound is
    just below the limit); above it the weight is read, and clamped."""
    from mergekit_sd.lora.bake import SAFE_DELTA

    base = base_with(tmp_path, bases, FC1_KEY, 65504.0, everywhere=True)
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", dtype="F16")
    plan = plan_bake(base, [LoraUse("l", lora, 1.0)], tmp_path / "unused.safetensors")
    plan.stop()
    bound = delta_bound(plan.weights[FC1_KEY])
    assert bound > 0
    below, above = 0.99 * SAFE_DELTA / bound, 1e4 * SAFE_DELTA / bound
    for strength, clamped in ((below, False), (above, True)):
        out = tmp_path / f"{clamped}.safetensors"
        code, _, err = cli("bake", base, f"{lora}:{strength!r}", "-o", out)
        assert code == 0, err
        assert ("clamped" in err) is clamped, err
        assert bool(torch.isfinite(load_file(out)[FC1_KEY]).all())


@pytest.mark.parametrize("fmt", ["kohya-sd1", "locon-sd1", "peft-sd1", "kohya-sdxl",
                                 "diffusers-flux"])
def test_delta_bound_bounds_every_element_of_the_deltas(tmp_path, fmt):
    """Every plain module's delta (linear, 1x1 and 3x3 convs, rows of fused weights), at its
    strength and alpha/rank, stays within the bound; other kinds of module have none."""
    arch = {"flux": "flux-dev"}.get(fmt.rsplit("-", 1)[1], fmt.rsplit("-", 1)[1])
    base = write_checkpoint(tmp_path / "b.safetensors", arch)
    lora = write_lora(tmp_path / "l.safetensors", fmt, dtype="F32")
    plan = plan_bake(base, [LoraUse("l", lora, -2.5)], tmp_path / "o.safetensors")
    plan.stop()
    checked = 0
    for key, apps in plan.weights.items():
        shape = plan.header.tensors[key].shape
        delta = apply_loras(torch.zeros(shape), apps, bias=False)
        bound = delta_bound(apps)
        assert float(delta.abs().max()) <= bound * (1 + 1e-5), key
        checked += 1
    assert checked > 10
    loha = write_lora(tmp_path / "h.safetensors", "loha-sd1")
    plan = plan_bake(base if arch == "sd1" else write_checkpoint(tmp_path / "s.safetensors",
                                                                   "sd1"),
                     [LoraUse("h", loha, 1.0)], tmp_path / "h_o.safetensors")
    plan.stop()
    assert all(delta_bound(apps) == float("inf") for apps in plan.weights.values())


def test_a_loose_delta_bound_at_the_safe_limit_gives_way_to_the_tighter_one(tmp_path):
    """The cheap bound (the rank times the factors' largest elements) is used while it stays
    below `SAFE_DELTA`; where it does not, the bound of the row and column norms, which is
    tighter, still bounds every element, and keeps a bake that need not read its weights
    from reading them."""
    base = write_checkpoint(tmp_path / "b.safetensors", "sd1")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", dtype="F16")

    def bounds(strength: float) -> dict[str, tuple[float, float]]:
        plan = plan_bake(base, [LoraUse("l", lora, strength)], tmp_path / "o.safetensors")
        plan.stop()
        return {key: (delta_bound(apps), float(apply_loras(
            torch.zeros(plan.header.tensors[key].shape), apps, bias=False).abs().max()))
            for key, apps in plan.weights.items()}

    small, large = bounds(1e-3), bounds(1e5)
    tighter = 0
    for key, (bound, delta) in large.items():
        assert delta <= bound * (1 + 1e-3), key
        loose = small[key][0] / 1e-3 * 1e5
        assert bound <= loose * (1 + 1e-6), key
        tighter += bound < 0.5 * loose
    assert tighter > len(large) / 2


# --- lora merge and lora extract -----------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, 4])
def test_lora_merge_refuses_a_lora_holding_nan_naming_the_tensor(tmp_path, bases, cli, rank):
    """It was a traceback from the SVD with --rank, and copied the NaN without."""
    bad = with_nan(write_lora(tmp_path / "bad.safetensors", "kohya-sd1"), f"{FC1}.lora_up.weight")
    good = write_lora(tmp_path / "good.safetensors", "kohya-sd1", seed=2)
    out = tmp_path / "m.safetensors"
    args = ("--rank", str(rank)) if rank else ()
    assert_one_sentence(*cli("lora", "merge", bad, good, "--base", bases["sd1"], *args,
                             "-o", out), 2)
    assert f"bad.safetensors: its tensor {FC1}.lora_up.weight holds NaN" in cli.last_err
    assert not out.exists()


@pytest.mark.parametrize("which", ["tuned", "base"])
def test_lora_extract_refuses_a_weight_holding_nan_naming_it(tmp_path, cli, which):
    paths = {"tuned": write_checkpoint(tmp_path / "tuned.safetensors", "sd1", dtype="F16",
                                       seed=5),
             "base": write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")}
    tensors = load_file(paths[which])
    tensors[PROJ_IN_KEY] = tensors[PROJ_IN_KEY].clone()
    tensors[PROJ_IN_KEY][1, 2] = float("inf")
    save_file(tensors, paths[which])
    out = tmp_path / "x.safetensors"
    assert_one_sentence(*cli("lora", "extract", paths["tuned"], paths["base"], "--rank", "2",
                             "-o", out), 2)
    assert f"{which}.safetensors: {PROJ_IN_KEY} holds NaN or infinite values" in cli.last_err
    assert not out.exists()


def test_lora_merge_and_extract_clamp_factors_beyond_fp16_with_a_note(tmp_path, bases, cli):
    """A merged or extracted LoRA is written in fp16 by default: factors beyond its range are
    clamped, with a note, never written as infinities."""
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", dtype="F32")
    merged = tmp_path / "m.safetensors"
    code, _, err = cli("lora", "merge", f"{a}:1e9", a, "-o", merged)
    assert code == 0, err
    assert "beyond fp16's range" in err
    assert all(bool(torch.isfinite(v).all()) for v in load_file(merged).values())
    with pytest.raises(UserError, match="holds NaN"):
        extract_lora(with_nan(write_checkpoint(tmp_path / "t.safetensors", "sd1", dtype="F32"),
                              PROJ_IN_KEY), bases["sd1"], tmp_path / "x.safetensors", rank=2)
    with pytest.raises(UserError, match="holds NaN"):
        merge_loras([(with_nan(write_lora(tmp_path / "n.safetensors", "kohya-sd1"),
                               f"{FC1}.lora_down.weight"), 1.0), (a, 1.0)],
                    tmp_path / "n_m.safetensors")


def test_a_finite_weight_whose_sum_overflows_is_finite(tmp_path, cli):
    """The check reads a baked weight's sum; a finite fp16 weight whose sum overflows fp16 is
    told apart (by aminmax) and baked as usual, not refused or clamped."""
    from mergekit_sd.lora.bake import _finite

    big = torch.full((64, 64), 60000.0, dtype=torch.float16)
    assert torch.isinf(big.sum()) and _finite(big)
    big[3, 4] = float("inf")
    assert not _finite(big)
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
    tensors = load_file(base)
    tensors[FC1_KEY] = torch.full_like(tensors[FC1_KEY], 30000.0)
    save_file(tensors, base)
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    out = tmp_path / "out.safetensors"
    code, _, err = cli("bake", base, f"{lora}:0.5", "-o", out)
    assert code == 0 and "note" not in err, err
    assert torch.isfinite(load_file(out)[FC1_KEY]).all()
