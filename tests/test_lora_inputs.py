"""LoRA bake, merge and extract on inputs off the common path: UNet-only files, bad strengths,
LoRAs of a sibling architecture, wrong files in the wrong place. Each case is one a review
found mishandled; the bake's results are checked against `test_lora_bake`'s own formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_lora_bake as lora_bake
import torch
from safetensors.torch import load_file
from test_lora_bake import UNET, expected_bake

from mergekit_sd.lora.bake import LoraUse, plan_bake
from mergekit_sd.lora.bake_run import run_bake
from mergekit_sd.lora.extract import extract_lora
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
