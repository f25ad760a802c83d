"""LoRA bake, extract and merge end to end on tiny layout-faithful models.

Every expected value is computed here, with torch, from the LoRA file's own tensors and the
formulas LyCORIS, kohya and PEFT use (never through `module_delta`), and compared with what
`run_bake` wrote; keys no module targets must come out byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sd.arch.architectures import ARCHITECTURES
from mergekit_sd.errors import Cancelled, UserError
from mergekit_sd.lora import bake as plan_module
from mergekit_sd.lora.bake import LoraUse, plan_bake
from mergekit_sd.lora.bake_run import run_bake
from mergekit_sd.lora.combine import merge_loras
from mergekit_sd.lora.extract import extract_lora
from mergekit_sd.lora.strengths import block_strengths
from mergekit_sd.progress import CancelToken
from mergekit_sd.testing import LORA_BASES, lora_targets, write_checkpoint, write_lora

UNET = "model.diffusion_model."
SD1_TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"

# --- independent formulas ------------------------------------------------------------------------

_UPS = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight",
        ".up.weight")
_DOWNS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight",
          ".lora_linear_layer.down.weight", ".down.weight")
_OTHER = (".alpha", ".lora_mid.weight", ".dora_scale", ".diff", ".diff_b",
          ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
          ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b",
          ".lokr_t2")
_SUFFIXES = _UPS + _DOWNS + _OTHER


def module_tensors(lora: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """suffix -> fp32 tensor of one module of a LoRA file."""
    found = {s: lora[module + s].float() for s in _SUFFIXES if module + s in lora}
    assert found, f"no tensors for {module}"
    return found


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product over the two channel dims (b may carry a kernel), by hand."""
    m, n = a.shape
    p, q = b.shape[:2]
    if b.ndim == 4:
        return torch.einsum("ij,klhw->ikjlhw", a, b).reshape(m * p, n * q, *b.shape[2:])
    return torch.einsum("ij,kl->ikjl", a, b).reshape(m * p, n * q)


def tucker(core, left, right):
    """core [a, b, h, w], left [a, out], right [b, in] -> [out, in, h, w] (LyCORIS' cores)."""
    return torch.einsum("abhw,ao,bi->oihw", core, left, right)


def expected_delta(t: dict[str, torch.Tensor], shape: tuple[int, ...],
                   default_alpha: float | None = None) -> torch.Tensor:
    """ΔW at strength 1 of one module, written out per algorithm."""
    if ".diff" in t:
        return t[".diff"].reshape(shape)
    if ".hada_w1_a" in t:
        scale = t[".alpha"].item() / t[".hada_w1_b"].shape[0]
        if ".hada_t1" in t:
            w1 = tucker(t[".hada_t1"], t[".hada_w1_a"], t[".hada_w1_b"])
            w2 = tucker(t[".hada_t2"], t[".hada_w2_a"], t[".hada_w2_b"])
        else:
            w1 = t[".hada_w1_a"] @ t[".hada_w1_b"]
            w2 = t[".hada_w2_a"] @ t[".hada_w2_b"]
        return (w1 * w2).reshape(shape) * scale
    if ".lokr_w2_b" in t or ".lokr_w2" in t:
        w1 = t[".lokr_w1"] if ".lokr_w1" in t else t[".lokr_w1_a"] @ t[".lokr_w1_b"]
        if ".lokr_t2" in t:
            w2 = tucker(t[".lokr_t2"], t[".lokr_w2_a"], t[".lokr_w2_b"])
        else:
            w2 = t[".lokr_w2_a"] @ t[".lokr_w2_b"]
        scale = t[".alpha"].item() / t[".lokr_w2_b"].shape[0]
        return kron(w1, w2).reshape(shape) * scale
    up = next(t[s] for s in _UPS if s in t)
    down = next(t[s] for s in _DOWNS if s in t)
    rank = down.shape[0]
    alpha = t[".alpha"].item() if ".alpha" in t else (default_alpha or rank)
    up2 = up.reshape(up.shape[0], rank)  # [out, r] (a conv's up is [out, r, 1, 1])
    if ".lora_mid.weight" in t:  # Tucker LoCon: ΔW[o,i,h,w] = Σ up[o,a] mid[a,b,h,w] down[b,i]
        delta = torch.einsum("oa,abhw,bi->oihw", up2, t[".lora_mid.weight"],
                             down.reshape(rank, -1))
    elif down.ndim == 4:  # LoCon: each kernel tap is its own rank-r product
        delta = torch.einsum("or,rihw->oihw", up2, down)
    else:
        delta = up2 @ down
    return delta.reshape(shape) * (alpha / rank)


def is_diffusion(key: str) -> bool:
    return key.startswith(UNET)


def expected_bake(base: dict[str, torch.Tensor], lora_path: Path, fmt: str,
                  strength=1.0, te_strength=None, default_alpha=None,
                  out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base with one LoRA applied, every module by the formulas above. `strength` may be a
    function of the target (per-block strengths)."""
    lora = load_file(lora_path)
    out = {k: v.float().clone() for k, v in base.items()} if out is None else out
    te_strength = strength if te_strength is None else te_strength
    for target in lora_targets(fmt):
        t = module_tensors(lora, target.module)
        if callable(strength):
            s = strength(target)
        else:
            s = strength if is_diffusion(target.key) else te_strength
        weight = out[target.key]
        view = weight if target.rows is None else weight[target.rows[0]:target.rows[1]]
        alpha = default_alpha(target.module) if callable(default_alpha) else default_alpha
        delta = expected_delta(t, target.shape, alpha)
        if ".dora_scale" in t:
            merged = view + delta  # W' = W + s·(m·(W+ΔW)/‖W+ΔW‖_row − W)
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
            norm = norm.reshape(-1, *([1] * (merged.ndim - 1)))
            magnitude = t[".dora_scale"].reshape(norm.shape)
            view.copy_(view + s * (magnitude * merged / norm - view))
        else:
            view += s * delta
        if ".diff_b" in t:
            assert target.bias is not None
            out[target.bias] += s * t[".diff_b"]
    return out


def assert_baked(baked: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 base: dict[str, torch.Tensor], changed: set[str], rtol: float = 1e-5) -> None:
    """`changed` keys equal `expected` within rtol of the weight's max-abs (and the change is
    far above that tolerance, so the check is not vacuous); every other key is byte-identical."""
    assert baked.keys() == base.keys()
    for key, value in baked.items():
        if key not in changed:
            assert value.dtype == base[key].dtype, key
            assert value.view(-1).view(torch.uint8).equal(base[key].view(-1).view(torch.uint8)), \
                f"{key} is not targeted and changed"
            continue
        exp, original = expected[key], base[key].float()
        scale = max(exp.abs().max().item(), original.abs().max().item())
        error = (value.float() - exp).abs().max().item()
        change = (exp - original).abs().max().item()
        assert error <= rtol * scale, f"{key}: error {error:.3g}, scale {scale:.3g}"
        assert change > 100 * rtol * scale, f"{key}: the change {change:.3g} is too small to test"


def changed_keys(fmt: str) -> set[str]:
    keys = set()
    for t in lora_targets(fmt):
        keys.add(t.key)
        if fmt.startswith("full-diff") and t.bias:
            keys.add(t.bias)
    return keys


def scaled_lora(path: Path, factor: float) -> Path:
    """Rewrite a LoRA with every factor tensor multiplied by `factor` (alphas and DoRA
    magnitudes kept), so that products of several small factors still change the weights by
    much more than fp32 rounding."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    for key, value in tensors.items():
        if not key.endswith((".alpha", ".dora_scale")):
            tensors[key] = value * factor
    save_file(tensors, path, metadata=metadata)
    return path


def bake(base: Path, uses: list[LoraUse], output: Path, **kwargs) -> dict[str, torch.Tensor]:
    plan = plan_bake(base, uses, output, **kwargs)
    assert plan.unmatched == []
    return load_file(run_bake(plan))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is far faster (a 20x144 SVD takes 0.15 ms on one thread and
    over 10 ms on two when the cores are busy) and keeps the file fast on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """F32 tiny checkpoints of every base a LoRA format is made for."""
    root = tmp_path_factory.mktemp("bases")
    return {v: write_checkpoint(root / f"{v}.safetensors", v, dtype="F32")
            for v in sorted(set(LORA_BASES.values()))}


@pytest.fixture
def cli(monkeypatch, capsys):
    """`mergekit-sd ARGS` through the console entry point, in this process (a fresh process
    costs seconds of imports per call): returns (exit code, stdout, stderr)."""
    from mergekit_sd.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["mergekit-sd", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        run.last_err = captured.err
        return exited.value.code, captured.out, captured.err

    return run


# --- 1. every format against its formula ---------------------------------------------------------

# format -> (factor the LoRA's values are scaled by, LoRA dtype); alpha 3 on rank 4 everywhere
_FORMULA_FORMATS = {
    "kohya-sd1": (5, "F16"), "locon-sd1": (5, "F32"), "tucker-sd1": (8, "F32"),
    "loha-sd1": (10, "F32"), "lokr-sd1": (8, "F32"), "full-diff-sd1": (1, "F32"),
    "dora-sdxl": (5, "F32"), "peft-sd1": (5, "F32"), "diffusers-old-sd1": (5, "F16"),
    "kohya-flux": (5, "F32"), "aitoolkit-flux": (5, "F32"), "xlabs-flux": (5, "F32"),
    "diffusers-flux": (5, "F32"), "kohya-sd3": (5, "F32"), "lycoris-sdxl": (8, "F32"),
}


@pytest.mark.parametrize("fmt", list(_FORMULA_FORMATS))
def test_bake_equals_the_formula_of_every_format(tmp_path, bases, fmt):
    factor, dtype = _FORMULA_FORMATS[fmt]
    lora = scaled_lora(write_lora(tmp_path / f"{fmt}.safetensors", fmt, rank=4, alpha=3.0,
                                  dtype=dtype), factor)
    base_path = bases[LORA_BASES[fmt]]
    base = load_file(base_path)
    baked = bake(base_path, [LoraUse(fmt, lora, 0.7, 0.4)], tmp_path / "out.safetensors")
    expected = expected_bake(base, lora, fmt, 0.7, 0.4)
    assert_baked(baked, expected, base, changed_keys(fmt))


def test_the_synthetic_formats_carry_the_variants_under_test(tmp_path):
    """The synthetic files do carry the variants the formulas above are meant to check."""
    def suffixes(fmt):
        keys = load_file(write_lora(tmp_path / f"{fmt}.safetensors", fmt))
        return {s for k in keys for s in _SUFFIXES if k.endswith(s)}

    assert {".hada_t1", ".hada_w1_a"} <= suffixes("loha-sd1")
    assert {".lokr_t2", ".lokr_w1_a", ".lokr_w1"} <= suffixes("lokr-sd1")
    assert ".lora_mid.weight" in suffixes("tucker-sd1")
    assert {".diff", ".diff_b"} <= suffixes("full-diff-sd1")
    assert any(t.rows for t in lora_targets("diffusers-flux"))
    assert any(t.key.endswith("linear1.weight") and t.rows for t in lora_targets("diffusers-flux"))


def test_peft_alpha_from_diffusers_adapter_metadata(tmp_path, bases):
    """diffusers writes PEFT's lora_alpha per component in `lora_adapter_metadata`; a component
    it does not name keeps scale 1."""
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet": {"lora_alpha": 2}})}
    lora = scaled_lora(write_lora(tmp_path / "peft.safetensors", "peft-sd1", rank=4,
                                  metadata=metadata, dtype="F32"), 5)
    base = load_file(bases["sd1"])
    baked = bake(bases["sd1"], [LoraUse("peft", lora, 1.3)], tmp_path / "out.safetensors")
    expected = expected_bake(base, lora, "peft-sd1", 1.3, default_alpha=lambda m: (
        2.0 if m.startswith("unet.") else None))
    assert_baked(baked, expected, base, changed_keys("peft-sd1"))


# --- 2. several LoRAs, text-encoder strength, per-block strengths --------------------------------


def test_several_loras_in_one_pass_equal_baking_them_one_after_another(tmp_path, bases):
    loras = [
        (write_lora(tmp_path / "a.safetensors", "kohya-sd1", alpha=2.0, seed=1), 0.8, None),
        (write_lora(tmp_path / "b.safetensors", "locon-sd1", seed=2), -0.5, 0.3),
        (write_lora(tmp_path / "c.safetensors", "loha-sd1", seed=3), 1.2, 0.0),
        (write_lora(tmp_path / "d.safetensors", "peft-sd1", seed=4), 0.6, None),
    ]
    uses = [LoraUse(p.stem, p, s, te) for p, s, te in loras]
    together = bake(bases["sd1"], uses, tmp_path / "together.safetensors")
    current = bases["sd1"]
    for i, use in enumerate(uses):
        bake(current, [use], tmp_path / f"step{i}.safetensors")
        current = tmp_path / f"step{i}.safetensors"
    one_by_one = load_file(current)
    base = load_file(bases["sd1"])
    assert together.keys() == one_by_one.keys()
    differ = 0
    for key, value in together.items():
        scale = base[key].float().abs().max().item() if value.is_floating_point() else 0
        assert (value - one_by_one[key]).abs().max().item() <= 1e-6 * max(scale, 1e-3), key
        differ += not torch.equal(value, base[key])
    assert differ > 300  # UNet, resnet convs and text encoder all changed


def test_te_strength_scales_only_text_encoder_targets(tmp_path, bases):
    lora = scaled_lora(write_lora(tmp_path / "l.safetensors", "kohya-sd1", alpha=8.0,
                                  dtype="F32"), 5)
    base = load_file(bases["sd1"])
    te_keys = {t.key for t in lora_targets("kohya-sd1") if not is_diffusion(t.key)}
    assert SD1_TE_KEY in te_keys and len(te_keys) == 72
    zero = bake(bases["sd1"], [LoraUse("l", lora, 0.9, 0.0)], tmp_path / "zero.safetensors")
    expected = expected_bake(base, lora, "kohya-sd1", 0.9, 0.0)
    assert_baked(zero, expected, base, changed_keys("kohya-sd1") - te_keys)
    scaled = bake(bases["sd1"], [LoraUse("l", lora, 0.9, -0.35)], tmp_path / "te.safetensors")
    assert_baked(scaled, expected_bake(base, lora, "kohya-sd1", 0.9, -0.35), base,
                 changed_keys("kohya-sd1"))
    # the UNet part does not depend on the text-encoder strength at all
    for key in changed_keys("kohya-sd1") - te_keys:
        assert torch.equal(zero[key], scaled[key]), key


_SD1_BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00",
               *(f"OUT{i:02d}" for i in range(12))]


def block_of(key: str) -> str:
    """SD1's block of a checkpoint key, by LoRA Block Weight's naming, written out here."""
    if not is_diffusion(key):
        return "TE"
    found = re.match(r"model\.diffusion_model\.(input_blocks|middle_block|output_blocks)"
                     r"\.(\d+)\.", key)
    assert found, key
    kind, n = found.groups()
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(n):02d}"


def bake_with_blocks(tmp_path, bases, lora, spec, per_block: dict[str, float], name: str):
    """Bake `lora` (locon-sd1: modules in every block but IN00, IN03, IN06, IN09) at strength
    0.8 / TE 0.5 with block spec `spec`, and check it against the per-block formula."""
    base = load_file(bases["sd1"])
    baked = bake(bases["sd1"], [LoraUse(name, lora, 0.8, 0.5, spec)],
                 tmp_path / f"{name}.safetensors")

    def strength(target):
        block = block_of(target.key)
        if block == "TE":
            return 0.5 * per_block["BASE"]
        return 0.8 * per_block[block]

    expected = expected_bake(base, lora, "locon-sd1", strength)
    changed = {t.key for t in lora_targets("locon-sd1") if strength(t) != 0}
    assert_baked(baked, expected, base, changed)
    return baked, base


@pytest.fixture(scope="module")
def locon(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("locon") / "locon.safetensors"
    return scaled_lora(write_lora(path, "locon-sd1", alpha=2.0, dtype="F32"), 5)


def test_block_strengths_list_of_26_for_sd1(tmp_path, bases, locon):
    assert list(ARCHITECTURES["sd1"].blocks) == _SD1_BLOCKS
    values = [round(0.05 * i - 0.3, 2) for i in range(26)]  # IN06 is 0: no change there
    per_block = dict(zip(_SD1_BLOCKS, values, strict=True))
    blocks_hit = {block_of(t.key) for t in lora_targets("locon-sd1")}
    assert len(blocks_hit) >= 20
    bake_with_blocks(tmp_path, bases, locon, values, per_block, "list")
    # the same as a comma-separated string
    text = ",".join(str(v) for v in values)
    assert block_strengths(text, ARCHITECTURES["sd1"]) == {**per_block, "TE": per_block["BASE"]}


def test_block_strengths_lbw_17_short_form(tmp_path, bases, locon):
    short = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             *(f"OUT{i:02d}" for i in range(3, 12))]
    values = [0.5, 0, 0.25, 1.5, 0, 2, 0.75, -1, 0, 0.5, 1, 1, 0.1, 0.2, 0.3, 0.4, 0]
    per_block = dict.fromkeys(_SD1_BLOCKS, 1.0)  # blocks the short form leaves out: 1
    per_block.update(zip(short, values, strict=True))
    baked, base = bake_with_blocks(tmp_path, bases, locon, values, per_block, "lbw")
    # a block the short form leaves out (OUT00's resnet convs) is baked at full strength
    out00 = UNET + "output_blocks.0.0.in_layers.2.weight"
    assert not torch.equal(baked[out00], base[out00])


def test_block_strengths_preset_out_leaves_in_and_mid_blocks_unchanged(tmp_path, bases, locon):
    per_block = {b: float(b == "BASE" or b.startswith("OUT")) for b in _SD1_BLOCKS}
    baked, base = bake_with_blocks(tmp_path, bases, locon, "out", per_block, "out")
    for target in lora_targets("locon-sd1"):
        block = block_of(target.key)
        unchanged = torch.equal(baked[target.key], base[target.key])
        assert unchanged == (block.startswith("IN") or block == "M00"), target.key


def test_block_strengths_pattern_map(tmp_path, bases, locon):
    per_block = {b: 0.0 if b.startswith("IN") else (1.5 if b == "OUT05" else 1.0)
                 for b in _SD1_BLOCKS}
    baked, base = bake_with_blocks(tmp_path, bases, locon, {"IN*": 0, "OUT05": 1.5},
                                   per_block, "map")
    for target in lora_targets("locon-sd1"):
        if block_of(target.key).startswith("IN"):
            assert torch.equal(baked[target.key], base[target.key]), target.key



def test_a_block_map_takes_runs_of_blocks_as_merge_params_do():
    sd1 = ARCHITECTURES["sd1"]
    strengths = block_strengths({"IN03-IN01": 0.2, "M00": 0.5, "default": 1.0}, sd1)
    assert {b for b, v in strengths.items() if v == 0.2} == {"IN01", "IN02", "IN03"}
    assert strengths["M00"] == 0.5 and strengths["IN04"] == 1.0
    with pytest.raises(UserError, match="'IN00-IN40' runs through IN12, which SD1"):
        block_strengths({"IN00-IN40": 0.2}, sd1)


def test_a_block_map_takes_lora_block_weights_name_mid_for_m00():
    for arch in ("sd1", "sdxl"):
        strengths = block_strengths({"MID": 0.3}, ARCHITECTURES[arch])
        assert strengths["M00"] == 0.3
        assert {v for b, v in strengths.items() if b != "M00"} == {1.0}
    with pytest.raises(UserError, match="'MID' matches no block of FLUX"):
        block_strengths({"MID": 0.3}, ARCHITECTURES["flux-dev"])


@pytest.mark.parametrize("spec", [
    "1,2,3", [1.0] * 25, "bogus", {"XX*": 1}, [True] * 26, ["1"] * 26, 7, "in,out",
])
def test_bad_block_specs_raise_one_sentence(tmp_path, bases, spec):
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    with pytest.raises(UserError) as raised:
        plan_bake(bases["sd1"], [LoraUse("l.safetensors", lora, 1.0, None, spec)],
                  tmp_path / "out.safetensors")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("l.safetensors: blocks")
    assert len(message) < 300 and message.count(". ") == 0
    assert not (tmp_path / "out.safetensors").exists()


# --- 3. modules that land nowhere ----------------------------------------------------------------

BOGUS = "lora_unet_not_a_block_to_q"


def with_bogus_module(path: Path) -> Path:
    """The LoRA at `path` with one more module, named like kohya's but for no weight."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[f"{BOGUS}.lora_down.weight"] = torch.full((4, 16), 0.01, dtype=torch.float16)
    tensors[f"{BOGUS}.lora_up.weight"] = torch.full((16, 4), 0.01, dtype=torch.float16)
    tensors[f"{BOGUS}.alpha"] = torch.tensor(4.0)
    save_file(tensors, path, metadata=metadata)
    return path


def assert_one_sentence(code: int, out: str, err: str, expected: int) -> None:
    assert code == expected, (out, err)
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def test_unmatched_modules_fail_the_bake_unless_allowed(tmp_path, bases, cli):
    lora = with_bogus_module(write_lora(tmp_path / "extra.safetensors", "kohya-sd1"))
    out = tmp_path / "out.safetensors"
    refused = run_cli("bake", bases["sd1"], lora, "-o", out)  # a real process, as a user runs it
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    text = refused.stdout + refused.stderr
    assert "Traceback" not in text
    assert BOGUS in text
    assert ": 1 module names no weight of the base:" in text, text
    assert "1 LoRA module cannot be baked (1 names no weight of sd1.safetensors)" in text, text
    assert not out.exists() and list(tmp_path.glob("*.partial")) == []

    code, stdout, stderr = cli("bake", bases["sd1"], lora, "-o", out, "--allow-unmatched")
    assert code == 0, stderr
    assert BOGUS in stdout + stderr  # listed either way
    base = load_file(bases["sd1"])
    assert_baked(load_file(out), expected_bake(base, lora, "kohya-sd1"), base,
                 changed_keys("kohya-sd1"), rtol=1e-5)

    # the API reports it too, by LoRA and module name
    plan = plan_bake(bases["sd1"], [LoraUse("extra", lora)], tmp_path / "api.safetensors")
    assert [(u.lora, u.modules) for u in plan.unmatched] == [("extra", [BOGUS])]
    assert plan.unmatched_count == 1


def test_a_lora_for_another_architecture_is_refused_in_one_sentence(tmp_path, bases, cli):
    lora = write_lora(tmp_path / "xl.safetensors", "kohya-sdxl")
    out = tmp_path / "out.safetensors"
    assert_one_sentence(*cli("bake", bases["sd1"], lora, "-o", out), 2)
    assert "SDXL" in cli.last_err and "SD1" in cli.last_err
    assert not out.exists() and list(tmp_path.glob("*.partial")) == []


def test_an_error_before_any_progress_is_exactly_one_line(tmp_path, bases):
    """The progress bars start with the first report: an error before it is not preceded by
    the blank line an empty bar display leaves behind (a real process, as users see it)."""
    refused = run_cli("lora", "extract", bases["sd1"], bases["sd1"], "--rank", "0",
                      "-o", tmp_path / "x.safetensors")
    assert refused.returncode == 2
    assert refused.stderr == "error: --rank must be at least 1 and --conv-rank at least 0\n"
    assert refused.stdout == ""


def test_a_lora_none_of_whose_modules_lands_is_refused(tmp_path, bases):
    """A LoRA whose base cannot be told from its keys, and that names no weight of the base."""
    lora = tmp_path / "nowhere.safetensors"
    save_file({f"{BOGUS}.lora_down.weight": torch.zeros(4, 16),
               f"{BOGUS}.lora_up.weight": torch.zeros(16, 4),
               f"{BOGUS}.alpha": torch.tensor(4.0)}, lora)
    with pytest.raises(UserError) as raised:
        plan_bake(bases["sd1"], [LoraUse("nowhere", lora)], tmp_path / "out.safetensors")
    message = str(raised.value)
    assert "\n" not in message and "none of its 1 modules" in message and BOGUS in message


# --- 4. provenance -------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_recipe_and_baked_loras_record_every_input_with_its_sha256(tmp_path, monkeypatch, dtype):
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype=dtype,
                            metadata={"modelspec.title": "my base", "custom": "kept"})
    (tmp_path / "other").mkdir()
    style = write_lora(tmp_path / "style.safetensors", "kohya-sd1", seed=1)
    same_stem = write_lora(tmp_path / "other" / "style.safetensors", "locon-sd1", seed=2)
    detail = write_lora(tmp_path / "detail.safetensors", "loha-sd1", seed=3)
    uses = [LoraUse("style.safetensors", style, 0.8, 0.25),
            LoraUse("other/style.safetensors", same_stem, -0.5, None, "out"),
            LoraUse("detail.safetensors", detail, 1.0, None, [1.0] * 26)]
    output = tmp_path / "baked.safetensors"
    run_bake(plan_bake(base, uses, output))

    meta = metadata_of(output)
    assert meta["custom"] == "kept" and meta["modelspec.title"] == "baked"
    recipe = json.loads(meta["mergekit_sd.recipe"])
    assert recipe["models"] == {
        "base": {"ref": str(base), "sha256": sha256(base)},
        "style": {"ref": "style.safetensors", "sha256": sha256(style)},
        "style-2": {"ref": "other/style.safetensors", "sha256": sha256(same_stem)},
        "detail": {"ref": "detail.safetensors", "sha256": sha256(detail)},
    }
    assert sha256(style) != sha256(same_stem)
    [step] = recipe["steps"]
    assert step["method"] == "bake_lora" and step["inputs"] == ["base"]
    assert step["loras"] == [
        {"model": "style", "strength": 0.8, "te_strength": 0.25},
        {"model": "style-2", "strength": -0.5, "blocks": "out"},
        {"model": "detail", "strength": 1.0, "blocks": [1.0] * 26},
    ]
    assert recipe["output"]["step"] == "bake"
    baked = json.loads(meta["mergekit_sd.baked_loras"])
    assert baked == [
        {"name": "style.safetensors", "sha256": sha256(style), "model": "style",
         "strength": 0.8, "te_strength": 0.25},
        {"name": "style.safetensors", "sha256": sha256(same_stem), "model": "style-2",
         "strength": -0.5, "blocks": "out"},
        {"name": "detail.safetensors", "sha256": sha256(detail), "model": "detail",
         "strength": 1.0, "blocks": [1.0] * 26},
    ]


def test_the_base_hash_from_its_thread_equals_hashlib(tmp_path, bases, monkeypatch):
    """Several times, the hash not remembered, so that each bake hashes the base meanwhile."""
    monkeypatch.setattr(plan_module, "remembered_sha256", lambda path: None)
    lora = write_lora(tmp_path / "l.safetensors", "locon-sd1")
    expected = sha256(bases["sd1"])
    for i in range(3):
        output = run_bake(plan_bake(bases["sd1"], [LoraUse("l", lora, 0.5)],
                                    tmp_path / f"out{i}.safetensors"))
        recipe = json.loads(metadata_of(output)["mergekit_sd.recipe"])
        assert recipe["models"]["base"]["sha256"] == expected


def test_known_hashes_are_recorded_without_hashing(tmp_path, bases, monkeypatch):
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    monkeypatch.setattr(plan_module, "file_sha256", lambda *a: pytest.fail("hashed again"))
    monkeypatch.setattr(plan_module, "BackgroundSha256", lambda *a: pytest.fail("hashed again"))
    plan = plan_bake(bases["sd1"], [LoraUse("catalog:l", lora, sha256="AB" * 32)],
                     tmp_path / "out.safetensors", known_sha256="CD" * 32)
    recipe = json.loads(metadata_of(run_bake(plan))["mergekit_sd.recipe"])
    assert recipe["models"]["base"]["sha256"] == "cd" * 32
    assert recipe["models"]["l"] == {"ref": "catalog:l", "sha256": "ab" * 32}


# --- 5. atomicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_a_cancelled_bake_leaves_nothing_under_the_output_name(tmp_path, bases, existing):
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    output = tmp_path / "out.safetensors"
    if existing:
        output.write_bytes(b"an older file")
    token = CancelToken()
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done, total))
        if len(seen) == 20:
            token.cancel()

    plan = plan_bake(bases["sd1"], [LoraUse("l", lora)], output)
    with pytest.raises(Cancelled):
        run_bake(plan, progress, token)
    assert len(seen) == 20 and seen[-1][1] < seen[-1][2]  # stopped part-way
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["l.safetensors", "out.safetensors"] if existing else ["l.safetensors"])
    if existing:
        assert output.read_bytes() == b"an older file"


# --- 6. extract -> bake round trip ---------------------------------------------------------------

_NOT_LAYERS = ("embedding", "position")


def layer_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every weight a kohya LoRA can carry in SD1: the UNet's and the text encoder's linear
    layers and convolutions (1x1 and 3x3), not lookup tables, biases or norms."""
    return sorted(k for k, v in tensors.items()
                  if k.startswith((UNET, "cond_stage_model.")) and v.ndim in (2, 4)
                  and not any(n in k for n in _NOT_LAYERS))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, bases) -> tuple[Path, list[str]]:
    """The sd1 base with a full-rank random change of every layer a LoRA can carry."""
    tensors = load_file(bases["sd1"])
    keys = layer_keys(tensors)
    generator = torch.Generator().manual_seed(7)
    for key in keys:
        tensors[key] = tensors[key] + 0.01 * torch.randn(tensors[key].shape, generator=generator)
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, keys


def test_extract_at_full_rank_then_bake_gives_the_tuned_model_back(tmp_path, bases, tuned):
    tuned_path, keys = tuned
    lora = tmp_path / "extracted.safetensors"
    report = extract_lora(tuned_path, bases["sd1"], lora, rank=64, conv_rank=64,
                          clamp_quantile=1.0, dtype="fp32")
    assert report.modules == len(keys) > 300
    assert report.unchanged == 0 and report.skipped_convs == 0
    assert report.other_differences == []
    assert any(tensors.ndim == 4 and tensors.shape[2:] == (3, 3)
               for tensors in load_file(lora).values())
    baked = bake(bases["sd1"], [LoraUse("x", lora)], tmp_path / "baked.safetensors")
    base, target = load_file(bases["sd1"]), load_file(tuned_path)
    assert_baked(baked, target, base, set(keys))


def reconstruction_error(tmp_path, bases, tuned, rank: int) -> float:
    tuned_path, keys = tuned
    lora = tmp_path / f"rank{rank}.safetensors"
    extract_lora(tuned_path, bases["sd1"], lora, rank=rank, conv_rank=rank, clamp_quantile=1.0,
                 dtype="fp32")
    for key, value in load_file(lora).items():
        if key.endswith("lora_down.weight"):
            assert value.shape[0] == min(rank, value.shape[0], value[0].numel()), key
            assert value.shape[0] <= rank
    baked = bake(bases["sd1"], [LoraUse("x", lora)], tmp_path / f"baked{rank}.safetensors")
    target = load_file(tuned_path)
    return sum(float((baked[k] - target[k]).square().sum()) for k in keys) ** 0.5


def test_the_reconstruction_error_falls_strictly_as_the_rank_rises(tmp_path, bases, tuned):
    errors = [reconstruction_error(tmp_path, bases, tuned, r) for r in (1, 2, 4, 8)]
    assert all(a > b for a, b in pairwise(errors)), errors
    assert errors[-1] > 0.1 * errors[0]  # full-rank random deltas: truncation does cost


def test_extract_writes_exact_ranks_and_clamps_at_the_quantile(tmp_path, bases, tuned):
    tuned_path, _ = tuned
    exact, clamped = tmp_path / "exact.safetensors", tmp_path / "clamped.safetensors"
    extract_lora(tuned_path, bases["sd1"], exact, rank=4, conv_rank=2, clamp_quantile=1.0,
                 dtype="fp32")
    extract_lora(tuned_path, bases["sd1"], clamped, rank=4, conv_rank=2, clamp_quantile=0.9,
                 dtype="fp32")
    a, b = load_file(exact), load_file(clamped)
    assert a.keys() == b.keys()
    meta = metadata_of(exact)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    provenance = json.loads(meta["mergekit_sd.extracted_from"])
    assert provenance["tuned"]["sha256"] == sha256(tuned_path)
    assert provenance["base"]["sha256"] == sha256(bases["sd1"])
    clamped_some = 0
    for key in a:
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[:-len(".lora_down.weight")]
        down, up = a[key], a[module + ".lora_up.weight"]
        spatial = down.ndim == 4 and down.shape[2:] == (3, 3)
        assert down.shape[0] == (2 if spatial else 4), key
        assert a[module + ".alpha"].item() == down.shape[0]
        magnitudes = torch.cat([up.flatten(), down.flatten()]).abs()
        limit = magnitudes.kthvalue(int(torch.tensor(0.9 * magnitudes.numel()).ceil())).values
        assert torch.equal(b[key], down.clamp(-limit, limit)), key
        assert torch.equal(b[module + ".lora_up.weight"], up.clamp(-limit, limit)), key
        clamped_some += bool((down.abs() > limit).any())
    assert clamped_some > 100


# --- 7. lora merge -------------------------------------------------------------------------------


def assert_same_bake(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor],
                     base: dict[str, torch.Tensor], rtol: float = 1e-5) -> int:
    """The two baked models agree within rtol of each weight's max-abs; returns how many
    weights the bakes changed."""
    changed = 0
    for key, value in first.items():
        scale = max(base[key].float().abs().max().item(), 1e-3)
        assert (value.float() - second[key].float()).abs().max().item() <= rtol * scale, key
        changed += not torch.equal(value, base[key])
    return changed


def test_merge_by_concatenation_bakes_like_both_loras(tmp_path, bases, cli):
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", alpha=2.0, seed=1, dtype="F32")
    b = write_lora(tmp_path / "b.safetensors", "kohya-sd1", seed=2, dtype="F32")
    merged = tmp_path / "merged.safetensors"
    code, out, err = cli("lora", "merge", f"{a}:0.6", f"{b}:-0.3", "-o", merged,
                         "--dtype", "fp32")
    assert code == 0, err
    ranks = {v.shape[0] for k, v in load_file(merged).items() if k.endswith("lora_down.weight")}
    assert ranks == {8}  # ranks add up
    separately = bake(bases["sd1"], [LoraUse("a", a, 0.6), LoraUse("b", b, -0.3)],
                      tmp_path / "separately.safetensors")
    together = bake(bases["sd1"], [LoraUse("m", merged)], tmp_path / "together.safetensors")
    base = load_file(bases["sd1"])
    assert assert_same_bake(separately, together, base) == len(lora_targets("kohya-sd1"))
    provenance = json.loads(metadata_of(merged)["mergekit_sd.merged_loras"])
    # "strength", as bake and recipes call the number
    assert provenance == [{"name": "a.safetensors", "sha256": sha256(a), "strength": 0.6},
                          {"name": "b.safetensors", "sha256": sha256(b), "strength": -0.3}]


def test_merge_of_kohya_and_peft_bakes_like_both(tmp_path, bases):
    a = write_lora(tmp_path / "k.safetensors", "kohya-sd1", alpha=3.0, seed=1, dtype="F32")
    b = write_lora(tmp_path / "p.safetensors", "peft-sd1", seed=2, dtype="F32")
    merged = tmp_path / "merged.safetensors"
    report = merge_loras([(a, 0.8), (b, 1.5)], merged, dtype="fp32")
    assert report.unmatched == [] and report.modules == len(lora_targets("kohya-sd1"))
    assert report.rank == 8
    separately = bake(bases["sd1"], [LoraUse("k", a, 0.8), LoraUse("p", b, 1.5)],
                      tmp_path / "separately.safetensors")
    together = bake(bases["sd1"], [LoraUse("m", merged)], tmp_path / "together.safetensors")
    assert_same_bake(separately, together, load_file(bases["sd1"]))


def test_merge_by_svd_has_the_rank_asked_and_is_exact_at_full_rank(tmp_path, bases):
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", alpha=2.0, seed=1, dtype="F32")
    b = write_lora(tmp_path / "b.safetensors", "locon-sd1", seed=2, dtype="F32")
    base = load_file(bases["sd1"])
    separately = bake(bases["sd1"], [LoraUse("a", a, 0.6), LoraUse("b", b, 0.9)],
                      tmp_path / "separately.safetensors")
    errors = {}
    for rank in (8, 2):
        merged = tmp_path / f"svd{rank}.safetensors"
        report = merge_loras([(a, 0.6), (b, 0.9)], merged, rank=rank, base=bases["sd1"],
                             dtype="fp32")
        assert report.rank == rank
        ranks = {v.shape[0] for k, v in load_file(merged).items()
                 if k.endswith("lora_down.weight")}
        assert ranks == {rank}
        together = bake(bases["sd1"], [LoraUse("m", merged)], tmp_path / f"t{rank}.safetensors")
        if rank == 8:  # 4 + 4: the summed delta has rank 8 at most, so SVD keeps all of it
            assert_same_bake(separately, together, base)
        errors[rank] = sum(float((together[k] - separately[k]).square().sum())
                           for k in separately)
    assert errors[2] > 1e3 * errors[8]


def test_merge_of_loha_by_concatenation_asks_for_a_rank(tmp_path, bases, cli):
    a = write_lora(tmp_path / "a.safetensors", "loha-sd1", seed=1)
    b = write_lora(tmp_path / "b.safetensors", "kohya-sd1", seed=2)
    out = tmp_path / "merged.safetensors"
    assert_one_sentence(*cli("lora", "merge", a, b, "-o", out), 2)
    assert "--rank" in cli.last_err
    assert not out.exists()
    code, _, err = cli("lora", "merge", a, b, "-o", out, "--rank", "4", "--base", bases["sd1"])
    assert code == 0, err
    assert out.exists()


def test_one_lora_is_resized_by_svd_and_refused_without_a_rank(tmp_path, bases, cli):
    """`lora merge A --rank R` resizes a LoRA (a LoHa becomes a plain kohya LoRA); one LoRA
    concatenated would be itself, so that is refused in one sentence."""
    a = write_lora(tmp_path / "a.safetensors", "loha-sd1", seed=1, dtype="F32")
    out = tmp_path / "resized.safetensors"
    assert_one_sentence(*cli("lora", "merge", a, "-o", out), 2)
    assert "--rank" in cli.last_err and not out.exists()
    code, stdout, err = cli("lora", "merge", a, "--rank", "2", "--base", bases["sd1"], "-o", out)
    assert code == 0, err
    assert "merged 1 LoRA:" in stdout
    assert {v.shape[0] for k, v in load_file(out).items() if k.endswith("lora_down.weight")} == {2}


def test_a_lora_at_strength_0_is_left_out_with_a_note(tmp_path, bases, cli):
    """At strength 0 a LoRA adds nothing but its rank to a concatenation: left out, said."""
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", seed=1, dtype="F32")
    b = write_lora(tmp_path / "b.safetensors", "kohya-sd1", seed=2, dtype="F32")
    out = tmp_path / "merged.safetensors"
    code, stdout, err = cli("lora", "merge", f"{a}:0", b, "-o", out, "--dtype", "fp32")
    assert code == 0, err
    assert "a.safetensors: strength 0, so it is left out" in err and "rank up to 4" in stdout
    assert {v.shape[0] for k, v in load_file(out).items() if k.endswith("lora_down.weight")} == {4}
    assert_one_sentence(*cli("lora", "merge", f"{a}:0", f"{b}:0", "-o", out, "--overwrite"), 2)


def test_a_file_given_twice_is_listed_once_per_argument(tmp_path, cli):
    lora = with_bogus_module(write_lora(tmp_path / "x.safetensors", "kohya-sd1"))
    code, _, err = cli("lora", "merge", lora, lora, "-o", tmp_path / "m.safetensors")
    assert code == 1, err
    assert "x.safetensors (argument 1): 1 module names no weight" in err, err
    assert "x.safetensors (argument 2): 1 module names no weight" in err, err


def test_merge_of_two_sdxl_loras_with_clip_g_modules(tmp_path, bases):
    a = write_lora(tmp_path / "a.safetensors", "kohya-sdxl", seed=1, dtype="F32")
    b = write_lora(tmp_path / "b.safetensors", "kohya-sdxl", seed=2, dtype="F32")
    merged = tmp_path / "merged.safetensors"
    merge_loras([(a, 1.0), (b, 0.5)], merged, base=bases["sdxl"], dtype="fp32")
    separately = bake(bases["sdxl"], [LoraUse("a", a, 1.0), LoraUse("b", b, 0.5)],
                      tmp_path / "separately.safetensors")
    together = bake(bases["sdxl"], [LoraUse("m", merged)], tmp_path / "together.safetensors")
    assert_same_bake(separately, together, load_file(bases["sdxl"]))


def test_merge_and_bake_agree_on_a_zero_alpha(tmp_path, bases):
    """kohya reads an alpha of 0 as alpha = rank (scale 1); bake and merge must agree."""
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", alpha=0.0, seed=1, dtype="F32")
    b = write_lora(tmp_path / "b.safetensors", "kohya-sd1", seed=2, dtype="F32")
    merged = tmp_path / "merged.safetensors"
    merge_loras([(a, 1.0), (b, 1.0)], merged, dtype="fp32")
    separately = bake(bases["sd1"], [LoraUse("a", a), LoraUse("b", b)],
                      tmp_path / "separately.safetensors")
    together = bake(bases["sd1"], [LoraUse("m", merged)], tmp_path / "together.safetensors")
    assert_same_bake(separately, together, load_file(bases["sd1"]))


def lora_part(path: Path, out: Path, modules: list[str]) -> Path:
    """A LoRA holding only the named modules of the LoRA at `path`, with the same tensors."""
    tensors = {k: v for k, v in load_file(path).items() if k.split(".")[0] in modules}
    save_file(tensors, out, metadata=metadata_of(path))
    return out


def module_names(path: Path) -> list[str]:
    return sorted({k.split(".")[0] for k in load_file(path)})


def test_merge_leaves_out_the_modules_that_cancel_with_one_note(tmp_path, cli):
    """Modules whose merged factors multiply to exactly zero change nothing: they are left
    out (not written to bloat the file and pad `inspect`'s coverage), and one note says how
    many and names the first few; the other modules are written as they were."""
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", seed=1, dtype="F32")
    names = module_names(a)
    cancelled = names[:5]
    part = lora_part(a, tmp_path / "part.safetensors", cancelled)
    out = tmp_path / "merged.safetensors"
    code, stdout, err = cli("lora", "merge", f"{a}:0.7", f"{part}:-0.7", "-o", out,
                            "--dtype", "fp32")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "changed nothing" in line]
    assert len(notes) == 1, err
    assert notes[0].startswith("note: 5 modules changed nothing once merged")
    assert ", ".join(cancelled[:3]) + " …" in notes[0]
    written = load_file(out)
    assert module_names(out) == names[5:]
    assert f"{len(names) - 5} modules, rank up to 4" in stdout
    source = load_file(a)
    for name in names[5:]:
        assert torch.equal(written[f"{name}.lora_down.weight"], source[f"{name}.lora_down.weight"])
        assert torch.equal(written[f"{name}.lora_up.weight"],
                           source[f"{name}.lora_up.weight"] * 0.7)


@pytest.mark.parametrize(("strengths", "rank"), [
    ((1.0, -1.0), None), ((0.5, 0.5, -1.0), None), ((1.0, -1.0), 2)])
def test_a_merge_whose_every_module_cancels_is_refused(tmp_path, bases, cli, strengths, rank):
    """The same LoRA at strengths that sum to zero: nothing to write, so nothing is written
    (an empty LoRA), by concatenation or by SVD."""
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", seed=1, dtype="F32")
    out = tmp_path / "merged.safetensors"
    by_svd = ["--rank", str(rank), "--base", bases["sd1"]] if rank else []
    assert_one_sentence(*cli("lora", "merge", *(f"{a}:{s}" for s in strengths), "-o", out,
                             *by_svd), 2)
    assert "changes nothing" in cli.last_err and "nothing to write" in cli.last_err
    assert not out.exists()


def test_a_small_delta_that_does_not_cancel_exactly_is_kept(tmp_path, cli):
    """Zero is read off the factors, not within a tolerance: strengths 1 and -0.999 leave a
    delta a thousandth of the LoRA's (of values around 1e-5), and every module keeps it."""
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", seed=1, dtype="F32")
    out = tmp_path / "merged.safetensors"
    code, _, err = cli("lora", "merge", f"{a}:1", f"{a}:-0.999", "-o", out, "--dtype", "fp32")
    assert code == 0, err
    assert "changed nothing" not in err
    assert module_names(out) == module_names(a)
    written, source = load_file(out), load_file(a)
    name = module_names(a)[0]
    assert torch.allclose(written[f"{name}.lora_up.weight"],
                          source[f"{name}.lora_up.weight"] * 1e-3, rtol=1e-3, atol=0)


# --- 8. command-line smoke -----------------------------------------------------------------------


def test_the_usage_lines_call_the_number_after_a_lora_its_strength(cli):
    """bake, lora merge and recipes' bake_lora steps scale a LoRA's delta by the same number:
    one word for it, in the usage line (which shows even where the arguments' help does not)."""
    for command, usage in ((["bake"], "BASE LORA[:STRENGTH[:TE_STRENGTH]]..."),
                           (["lora", "merge"], "LORA[:STRENGTH]...")):
        code, out, _ = cli(*command, "--help")
        assert code == 0 and f"[OPTIONS] {usage}\n" in out, out


def test_bake_cli_strength_syntax_overwrite_and_inspect(tmp_path, bases, tuned, cli):
    lora = scaled_lora(write_lora(tmp_path / "l.safetensors", "kohya-sd1", alpha=2.0,
                                  dtype="F32"), 5)
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli("bake", bases["sd1"], f"{lora}:0.5:0.2", "-o", out)
    assert code == 0, err
    assert "baked 1 LoRA" in stdout
    base = load_file(bases["sd1"])
    assert_baked(load_file(out), expected_bake(base, lora, "kohya-sd1", 0.5, 0.2), base,
                 changed_keys("kohya-sd1"))
    [entry] = json.loads(metadata_of(out)["mergekit_sd.baked_loras"])
    assert (entry["strength"], entry["te_strength"]) == (0.5, 0.2)

    before = out.read_bytes()
    assert_one_sentence(*cli("bake", bases["sd1"], f"{lora}:0.9", "-o", out), 2)
    assert "--overwrite" in cli.last_err and out.read_bytes() == before
    code, _, err = cli("bake", bases["sd1"], f"{lora}:0.9", "-o", out, "--overwrite",
                       "--te-strength", "0")
    assert code == 0, err
    assert_baked(load_file(out), expected_bake(base, lora, "kohya-sd1", 0.9, 0.0), base,
                 {t.key for t in lora_targets("kohya-sd1") if is_diffusion(t.key)})

    # a bad --blocks is one sentence, before anything is written
    other = tmp_path / "other.safetensors"
    assert_one_sentence(*cli("bake", bases["sd1"], lora, "-o", other, "--blocks", "1,2"), 2)
    assert "26 or 17" in cli.last_err and not other.exists()

    # what follows an existing LoRA's name must be its numbers; the sentence says which part
    for arg, wrong in ((f"{lora}:strong", "'strong'"), (f"{lora}:0.5:0.2:9", "'0.5:0.2:9'")):
        assert_one_sentence(*cli("bake", bases["sd1"], arg, "-o", other), 2)
        assert f"{wrong} after the file name is not STRENGTH[:TE_STRENGTH]" in cli.last_err
        assert f"e.g. {lora}:0.8" in cli.last_err and not other.exists()
    assert_one_sentence(*cli("lora", "merge", f"{lora}:0.5:0.2", lora, "-o", other), 2)
    assert "'0.5:0.2' after the file name is not STRENGTH; give one number" in cli.last_err
    assert_one_sentence(*cli("bake", bases["sd1"], f"{tmp_path}/none.safetensors:0.5", "-o",
                             other), 2)
    assert "none.safetensors: does not exist; give an existing path" in cli.last_err

    extracted = tmp_path / "extracted.safetensors"
    code, stdout, err = cli("lora", "extract", tuned[0], bases["sd1"], "--rank", "4",
                            "--conv-rank", "2", "-o", extracted)
    assert code == 0, err
    assert "extracted" in stdout
    code, stdout, err = cli("inspect", "--json", extracted)
    assert code == 0, err
    [info] = json.loads(stdout)
    assert info["kind"] == "lora" and info["architecture"] == "sd1"
    assert info["lora"]["format"].startswith("kohya")
    assert {int(r) for r in info["lora"]["ranks"]} == {2, 4}
    code, stdout, err = cli("inspect", extracted)
    assert code == 0 and "rank 4" in stdout, stdout


# --- a module whose shapes do not fit its weight, in the CLI and in a recipe ---------------------


def _lora_with_one_wrong_width(tmp_path) -> tuple[Path, str]:
    path = write_lora(tmp_path / "wide.safetensors", "kohya-sd1")
    tensors = load_file(path)
    up = next(k for k in tensors if k.endswith(".lora_up.weight"))
    tensors[up] = torch.zeros(tensors[up].shape[0] * 2, *tensors[up].shape[1:],
                              dtype=tensors[up].dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return path, up.removesuffix(".lora_up.weight")


def test_a_module_of_the_wrong_width_is_listed_before_anything_is_written(tmp_path, bases, cli):
    lora, module = _lora_with_one_wrong_width(tmp_path)
    out = tmp_path / "out.safetensors"
    code, _, err = cli("bake", bases["sd1"], lora, "-o", out)
    assert code == 1 and module in err and "do not fit" in err
    assert not out.exists()


def test_a_recipe_refuses_a_module_of_the_wrong_width_while_planning(tmp_path, bases, cli):
    lora, module = _lora_with_one_wrong_width(tmp_path)
    recipe = tmp_path / "bake.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  wide: {lora}\nsteps:\n"
        "  - name: baked\n    method: bake_lora\n    inputs: [base]\n    loras:\n"
        "      - model: wide\noutput:\n  path: out.safetensors\n")
    code, _, err = cli("plan", recipe)
    assert code == 2 and "steps.0.loras" in err and module in err
    assert "allow_unmatched" in err


def test_a_recipe_allowing_unmatched_modules_lists_them_in_its_notes(tmp_path, bases, cli):
    """allow_unmatched: true bakes the rest, as --allow-unmatched does, and lists what it left
    out (plan, merge's stderr and --json notes): every module lands or is listed."""
    lora = with_bogus_module(write_lora(tmp_path / "extra.safetensors", "kohya-sd1"))
    recipe = tmp_path / "bake.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {bases['sd1']}\n  extra: {lora}\nsteps:\n"
        "  - name: baked\n    method: bake_lora\n    allow_unmatched: true\n"
        "    inputs: [base]\n    loras:\n      - model: extra\noutput:\n  path: out.safetensors\n")
    code, out, err = cli("plan", recipe)
    assert code == 0, err
    flat = " ".join(out.split())  # the table wraps long lines
    assert "1 LoRA module not baked" in flat and BOGUS in flat, out
    code, out, err = cli("merge", recipe, "--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any("1 LoRA module not baked" in n and f"extra: {BOGUS}" in n for n in notes), notes
    assert BOGUS in err


def test_a_bake_replaces_the_bases_automatic1111_keys_as_a_bake_lora_step_does(tmp_path, cli):
    """The base's sd_merge_recipe (a plain merge's) is not copied onto the baked file: `bake`
    writes AUTOMATIC1111's keys and modelspec's lineage as a recipe's bake_lora step does, the
    base in the primary slot and its own recipe nested under sd_merge_models."""
    mix = {"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.3,
           "custom_name": "mix", "primary_model_hash": "a" * 64}
    ancestors = {"a" * 64: {"name": "a.safetensors", "legacy_hash": "01234567",
                            "sd_merge_recipe": None}}
    base = write_checkpoint(tmp_path / "mix.safetensors", "sd1", dtype="F32", metadata={
        "sd_merge_recipe": json.dumps(mix), "sd_merge_models": json.dumps(ancestors),
        "modelspec.merged_from": "a.safetensors, b.safetensors", "modelspec.date": "2020-01-01"})
    lora = write_lora(tmp_path / "style.safetensors", "kohya-sd1")
    code, _, err = cli("bake", base, f"{lora}:0.8", "-o", tmp_path / "baked.safetensors")
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  base: {base}\n  style: {lora}\nsteps:\n"
        "  - name: bake\n    method: bake_lora\n    inputs: [base]\n    loras:\n"
        "      - {model: style, strength: 0.8}\n"
        "output:\n  path: stepped.safetensors\n  title: baked\n  dtype: keep\n")
    code, _, err = cli("merge", recipe)
    assert code == 0, err
    with safe_open(tmp_path / "baked.safetensors", "pt") as f:
        baked = f.metadata()
    with safe_open(tmp_path / "stepped.safetensors", "pt") as f:
        stepped = f.metadata()
    a1111 = json.loads(baked["sd_merge_recipe"])
    assert (a1111["interp_method"], a1111["custom_name"]) == ("bake_lora", "baked")
    assert a1111["primary_model_hash"] == hashlib.sha256(base.read_bytes()).hexdigest()
    models = json.loads(baked["sd_merge_models"])
    assert models[a1111["primary_model_hash"]]["sd_merge_recipe"] == mix
    assert models["a" * 64] == ancestors["a" * 64]
    for key in ("sd_merge_recipe", "sd_merge_models", "modelspec.merged_from", "modelspec.date"):
        assert baked[key] == stepped[key], key


def test_tensors_of_no_module_kind_are_listed_like_unmatched_modules(tmp_path, bases):
    lora = write_lora(tmp_path / "norms.safetensors", "kohya-sd1")
    with safe_open(lora, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(lora)
    norm = "lora_unet_input_blocks_1_0_in_layers_0"
    tensors[f"{norm}.w_norm"] = torch.zeros(32, dtype=torch.float16)
    tensors["bundle_emb.mychar.string_to_param.*"] = torch.zeros(2, 16, dtype=torch.float16)
    save_file(tensors, lora, metadata=metadata)
    plan = plan_bake(bases["sd1"], [LoraUse("norms", lora)], tmp_path / "api.safetensors")
    assert [(u.lora, u.modules, sorted(u.malformed)) for u in plan.unmatched] == [("norms", [], [
        "bundle_emb.mychar.string_to_param.* (a bundled textual-inversion embedding, not a "
        "weight; load it as an embedding)",
        f"{norm}.w_norm (a LyCORIS norm-layer change, which mergekit-sd does not apply)"])]
    refused = run_cli("bake", bases["sd1"], lora, "-o", tmp_path / "out.safetensors")
    assert refused.returncode == 1 and "w_norm" in refused.stdout + refused.stderr
    merged = run_cli("lora", "merge", lora, lora, "-o", tmp_path / "merged.safetensors")
    assert merged.returncode == 1 and "bundle_emb" in merged.stdout + merged.stderr
