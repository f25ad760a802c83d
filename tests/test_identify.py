"""Identification from headers: every architecture, part and LoRA format, with its evidence."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from mergekit_sd.arch.identify import identify
from mergekit_sd.io.header import read_header
from mergekit_sd.testing import LORA_FORMATS, write_checkpoint, write_lora

# variant -> (kind, architecture, layout, variant)
CHECKPOINTS = {
    "sd1": ("checkpoint", "sd1", "ldm", None),
    "sd1-inpainting": ("checkpoint", "sd1", "ldm", "inpainting"),
    "sd2": ("checkpoint", "sd2", "ldm", None),
    "sd2-inpainting": ("checkpoint", "sd2", "ldm", "inpainting"),
    "sdxl": ("checkpoint", "sdxl", "sgm", None),
    "sdxl-refiner": ("checkpoint", "sdxl-refiner", "sgm", None),
    "sdxl-inpainting": ("checkpoint", "sdxl", "sgm", "inpainting"),
    "sd3-medium": ("checkpoint", "sd3-medium", "comfy", None),
    "sd35-medium": ("checkpoint", "sd3.5-medium", "comfy", None),
    "sd35-large": ("checkpoint", "sd3.5-large", "comfy", None),
    "flux-dev": ("checkpoint", "flux-dev", "comfy", None),
    "flux-schnell": ("checkpoint", "flux-schnell", "comfy", None),
    "flux-fill": ("checkpoint", "flux-fill", "comfy", "fill"),
    "sd1-unet": ("diffusion_model", "sd1", "ldm", None),
    "sdxl-unet": ("diffusion_model", "sdxl", "sgm", None),
    "flux-dev-transformer": ("diffusion_model", "flux-dev", "bfl", None),
    "flux-schnell-transformer": ("diffusion_model", "flux-schnell", "bfl", None),
    "sd3-medium-transformer": ("diffusion_model", "sd3-medium", "mmdit", None),
    "vae-sd": ("vae", "VAE (4 latent channels)", "ldm", None),
    "vae-flux": ("vae", "VAE (16 latent channels)", "ldm", None),
    "clip-l": ("text_encoder", "CLIP-L", "transformers", None),
    "clip-g": ("text_encoder", "CLIP-G", "transformers", None),
    "t5xxl": ("text_encoder", "T5-XXL", "transformers", None),
}

# format -> (words in the format name, base architecture)
LORAS = {
    "kohya-sd1": ("kohya LoRA", "sd1"),
    "kohya-sd2": ("kohya LoRA", "sd2"),
    "kohya-sdxl": ("kohya LoRA", "sdxl"),
    "locon-sd1": ("kohya LoCon", "sd1"),
    "tucker-sd1": ("LoCon (Tucker)", "sd1"),
    "loha-sd1": ("LoHa", "sd1"),
    "lokr-sd1": ("LoKr", "sd1"),
    "full-diff-sd1": ("full diff", "sd1"),
    "dora-sdxl": ("DoRA", "sdxl"),
    "peft-sd1": ("diffusers/PEFT", "sd1"),
    "peft-sdxl": ("diffusers/PEFT", "sdxl"),
    "diffusers-old-sd1": ("diffusers LoRA", "sd1"),
    "kohya-flux": ("kohya LoRA", "flux-dev"),
    "aitoolkit-flux": ("ai-toolkit", "flux-dev"),
    "xlabs-flux": ("XLabs", "flux-dev"),
    "diffusers-flux": ("diffusers/PEFT", "flux-dev"),
    "kohya-sd3": ("kohya LoRA", "sd3-medium"),
    "lycoris-sdxl": ("LoKr", "sdxl"),
}


def test_every_generated_format_has_an_expectation():
    assert set(LORAS) == set(LORA_FORMATS)


@pytest.mark.parametrize("variant", list(CHECKPOINTS))
def test_full_size_files_are_identified(tmp_path, variant):
    path = write_checkpoint(tmp_path / f"{variant}.safetensors", variant, size="full",
                            fill="sparse")
    found = identify(read_header(path))
    kind, architecture, layout, variant_name = CHECKPOINTS[variant]
    assert (found.kind, found.architecture, found.layout, found.variant) == (
        kind, architecture, layout, variant_name), found.evidence
    if kind in ("checkpoint", "diffusion_model"):
        assert found.evidence, "an answer must say what decided it"


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl", "sd3-medium", "flux-dev",
                                     "flux-schnell", "sd1-inpainting", "vae-flux", "clip-g"])
def test_tiny_files_are_identified_by_their_key_names(tmp_path, variant):
    path = write_checkpoint(tmp_path / f"{variant}.safetensors", variant)
    found = identify(read_header(path))
    assert (found.kind, found.architecture) == CHECKPOINTS[variant][:2], found.evidence


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("fmt", list(LORAS))
def test_lora_formats_and_bases(tmp_path, fmt, size):
    if fmt == "full-diff-sd1" and size == "full":
        pytest.skip("a full-size full diff is a whole model's worth of data")
    path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, size=size, metadata={})
    found = identify(read_header(path))
    words, base = LORAS[fmt]
    assert found.kind == "lora"
    assert words in found.lora.format, found.lora.format
    assert found.lora.base == base, found.evidence + found.caveats
    assert found.lora.modules > 0
    assert found.lora.rank or fmt == "full-diff-sd1", "low-rank formats report their rank"
    # every module of these files has one rank (LoKr's Tucker convs store w2_a as [rank, out])
    assert set(found.lora.ranks) <= {found.lora.rank}, found.lora.ranks


def test_inspect_says_a_full_diff_has_no_rank_or_alpha(tmp_path):
    """A full diff stores whole weight changes: no rank, no alpha, and no warning that its
    metadata names an alpha it has no place for."""
    path = write_lora(tmp_path / "full.safetensors", "full-diff-sd1")
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "full-rank weight differences (no rank or alpha)" in text, text
    assert "None" not in text and "ss_network_alpha" not in text.split("metadata")[0]


def test_lora_blocks_and_targets(tmp_path):
    sdxl = identify(read_header(write_lora(tmp_path / "x.safetensors", "kohya-sdxl")))
    assert {"BASE", "IN04", "M00", "OUT00"} <= set(sdxl.lora.blocks)
    assert set(sdxl.lora.targets) == {"diffusion_model", "text_encoder", "text_encoder_2"}
    flux = identify(read_header(write_lora(tmp_path / "f.safetensors", "kohya-flux")))
    assert {"D00", "S00"} <= set(flux.lora.blocks)
    sd1 = identify(read_header(write_lora(tmp_path / "p.safetensors", "peft-sd1")))
    assert "IN01" in sd1.lora.blocks and "OUT11" in sd1.lora.blocks


def test_sd2_says_what_it_cannot_know(tmp_path):
    path = write_checkpoint(tmp_path / "sd2.safetensors", "sd2", size="full", fill="sparse")
    found = identify(read_header(path))
    assert found.prediction.startswith("unknown")
    assert any("prediction type cannot be told" in c for c in found.caveats)


def test_sdxl_finetune_families_are_hints_not_facts(tmp_path):
    path = write_checkpoint(tmp_path / "pony.safetensors", "sdxl", size="full", fill="sparse",
                            metadata={"modelspec.title": "Pony Diffusion V6 XL"})
    found = identify(read_header(path))
    assert found.architecture == "sdxl"
    assert any("Pony" in e and "hint" in e for e in found.evidence)
    assert any("Pony, Illustrious and NoobAI" in c for c in found.caveats)


def test_inspect_json_reports_what_a_script_needs(tmp_path):
    ckpt = write_checkpoint(tmp_path / "xl.safetensors", "sdxl", size="full", fill="sparse",
                            dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", rank=8, alpha=4.0)
    result = run_cli("inspect", "--json", ckpt, lora)
    assert result.returncode == 0, result.stderr
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(result.stdout)}
    xl = by_name["xl.safetensors"]
    assert xl["architecture"] == "sdxl" and xl["kind"] == "checkpoint"
    assert xl["dtypes"].get("F16", 0) > 2000
    assert xl["status"].startswith("complete")
    assert {c["slot"] for c in xl["components"]} >= {"diffusion_model", "text_encoder",
                                                      "text_encoder_2", "vae"}
    assert xl["header_bytes"] < 1_000_000 < xl["file_size"]
    lo = by_name["l.safetensors"]["lora"]
    assert (lo["rank"], float(lo["alpha"])) == (8, 4.0)
    assert lo["trigger_words"], "kohya ss_tag_frequency should give trigger words"


def test_lora_alpha_is_read_from_its_tensors_when_metadata_is_silent(tmp_path):
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", rank=8, alpha=2.0, metadata={})
    result = run_cli("inspect", "--json", lora)
    assert json.loads(result.stdout)[0]["lora"]["alpha"] == 2.0


def test_inspect_shows_the_peft_alphas_bake_takes_from_adapter_metadata(tmp_path):
    """diffusers stores a PEFT LoRA's alpha in `lora_adapter_metadata`, per component, not in
    tensors: inspect shows those values, which bake scales by, not "none stored"."""
    metadata = {"lora_adapter_metadata": json.dumps(
        {"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": 2, "text_encoder.r": 4})}
    lora = write_lora(tmp_path / "p.safetensors", "peft-sd1", rank=4, metadata=metadata)
    doc = json.loads(run_cli("inspect", "--json", lora).stdout)[0]["lora"]
    assert doc["alpha"] == [2, 8]
    assert doc["alpha_note"] == "from lora_adapter_metadata: text_encoder 2, unet 8"


def test_inspect_table_shows_evidence_for_one_file(tmp_path):
    path = write_checkpoint(tmp_path / "f.safetensors", "flux-schnell-transformer", size="full",
                            fill="sparse")
    result = run_cli("inspect", path)
    assert result.returncode == 0
    assert "FLUX.1-schnell" in result.stdout
    assert "no guidance_in" in result.stdout


@pytest.mark.parametrize("columns", [80, 120])
def test_inspect_summary_keeps_names_and_short_words_whole_where_they_fit(tmp_path, columns):
    """Short cells ("checkpoint") never break; file names stay whole once the terminal has room
    for them beside a readable description."""
    names = ["demo-sd15-anime.safetensors", "demo-loha-style.safetensors"]
    write_checkpoint(tmp_path / names[0], "sd1")
    write_lora(tmp_path / names[1], "loha-sd1")
    result = run_cli("inspect", *(tmp_path / n for n in names), env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\n\n")[0]
    assert max(len(line) for line in table.splitlines()) <= columns
    assert "│ checkpoint │" in table and "│ lora " in table
    assert all((name in table) == (columns == 120) for name in names)


def test_inspect_shows_lineage_nested_past_the_json_parser_as_it_is_stored(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", metadata={"sd_merge_recipe": deep})
    result = run_cli("inspect", "--json", path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["metadata"]["sd_merge_recipe"] == deep


def _with_alphas(path, value, out):
    """A copy of the LoRA at `path` whose every alpha tensor is `value`."""
    from safetensors.torch import load_file, save_file

    save_file({k: value.clone() if k.endswith(".alpha") else t
               for k, t in load_file(path).items()}, out)
    return out


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("said", "note"), [
    ("Dynamic", "ss_network_alpha says Dynamic; the tensors' values apply"),
    ("1", "ss_network_alpha says 1; the tensors' values apply"),
    ("2", None),
])
def test_lora_alpha_is_the_tensors_and_metadata_that_disagrees_is_noted(tmp_path, said, note):
    from mergekit_sd.inspect_report import inspect_file

    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", rank=4, alpha=2.0,
                      metadata={"ss_network_alpha": said})
    report = inspect_file(lora)["lora"]
    assert (report["alpha"], report["alpha_note"]) == (2.0, note)


@pytest.mark.parametrize(("value", "note"), [
    ("nan", "alpha tensor(s) nan (invalid)"),
    ("empty", "alpha tensor(s) not a number (F32, shape [0])"),
    ("bool", "alpha tensor(s) not a number (BOOL, shape [])"),
])
def test_alphas_that_are_no_numbers_are_reported_once_in_valid_json(tmp_path, capsys, value,
                                                                    note):
    import torch

    from mergekit_sd.inspect_report import inspect_files

    tensor = {"nan": torch.tensor(float("nan")), "empty": torch.zeros(0),
              "bool": torch.tensor(True)}[value]
    lora = _with_alphas(write_lora(tmp_path / "l.safetensors", "kohya-sd1", metadata={}),
                        tensor, tmp_path / "odd.safetensors")
    assert inspect_files([lora], as_json=True) == 0
    report = _strict_json(capsys.readouterr().out)[0]["lora"]
    assert report["alpha"] is None and report["alpha_note"].endswith(note)
    assert inspect_files([lora]) == 0
    table = capsys.readouterr().out
    assert table.count("alpha unknown") == 1 and note in " ".join(table.split())


def test_a_merge_recipe_with_nan_in_the_metadata_stays_a_string_in_json(tmp_path, capsys):
    from mergekit_sd.inspect_report import inspect_files

    path = write_checkpoint(tmp_path / "m.safetensors", "sd1",
                            metadata={"sd_merge_recipe": '{"alpha": NaN, "beta": Infinity}'})
    assert inspect_files([path], as_json=True) == 0
    report = _strict_json(capsys.readouterr().out)[0]
    assert report["metadata"]["sd_merge_recipe"] == '{"alpha": NaN, "beta": Infinity}'


def test_verbose_and_json_show_every_kohya_key(tmp_path, capsys):
    from mergekit_sd.inspect_report import inspect_files

    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", metadata={
        "ss_network_alpha": "4", "ss_seed": "42", "ss_optimizer": "AdamW8bit", "note": "hi"})
    assert inspect_files([lora], as_json=True) == 0
    metadata = _strict_json(capsys.readouterr().out)[0]["metadata"]
    assert metadata["kohya"]["ss_seed"] == "42" and metadata["other"] == {"note": "hi"}
    inspect_files([lora])
    assert "ss_seed" not in capsys.readouterr().out
    inspect_files([lora], verbose=True)
    assert "AdamW8bit" in capsys.readouterr().out


def test_a_flux_fill_checkpoint_is_labelled_fill_once(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(write_checkpoint(tmp_path / "dev.safetensors", "flux-dev"))
    key = "model.diffusion_model.img_in.weight"
    tensors[key] = tensors[key].new_zeros(tensors[key].shape[0], 384)
    save_file(tensors, tmp_path / "fill.safetensors")
    found = identify(read_header(tmp_path / "fill.safetensors"))
    assert found.label.startswith("FLUX.1 Fill with ") and "fill" not in found.label


def test_at_80_columns_inspect_cuts_no_slot_prefix_or_short_word(tmp_path, capsys, monkeypatch):
    from mergekit_sd.inspect_report import inspect_files

    monkeypatch.setenv("COLUMNS", "80")
    paths = [write_checkpoint(tmp_path / f"{v}.safetensors", v)
             for v in ("sd3-medium", "sd1", "clip-l", "sd1-unet", "flux-dev")]
    assert inspect_files(paths[:1]) == 0
    details = capsys.readouterr().out
    assert "…" not in details and max(map(len, details.splitlines())) <= 80
    assert all(f"│ {slot} " in details
               for slot in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert inspect_files(paths) == 0
    summary = capsys.readouterr().out
    assert max(map(len, summary.splitlines())) <= 80
    for word in ("checkpoint", "text_encoder", "diffusion_model", "SD3-Medium", "FLUX.1-dev"):
        assert f" {word} " in summary, word


def test_inspect_identifies_pickles_as_a_scan_does_without_running_them(tmp_path):
    """A .ckpt/.pt is identified from its small pickle (the scan's identification); one that
    would run code, a truncated one and a legacy pickle each get their own sentence."""
    import os

    import torch
    from safetensors.torch import load_file

    source = write_checkpoint(tmp_path / "sd1.safetensors", "sd1", dtype="F16")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": load_file(source)}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    legacy = tmp_path / "old.pt"
    torch.save(load_file(source), legacy, _use_new_zipfile_serialization=False)
    marker = tmp_path / "ran"

    class Evil:  # loaded unrestricted, it would run a command
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.ckpt"
    torch.save({"model.diffusion_model.x": torch.zeros(1), "hook": Evil()}, evil)
    result = run_cli("inspect", "--json", good, cut, legacy, evil)
    assert result.returncode == 2
    found = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(result.stdout)}
    reference = json.loads(run_cli("inspect", "--json", source).stdout)[0]
    ckpt = found["good.ckpt"]
    assert (ckpt["kind"], ckpt["architecture"], ckpt["dtypes"], ckpt["parameters"]) == (
        "checkpoint", "sd1", reference["dtypes"], reference["parameters"])
    assert ckpt["status"].startswith("a PyTorch pickle (zip checkpoint)")
    assert "truncated" in found["cut.ckpt"]["error"]
    assert found["cut.ckpt"]["error"].endswith("download it again")
    assert "legacy format" in found["old.pt"]["error"]
    assert "would run code" in found["evil.ckpt"]["error"]
    assert not marker.exists()
    assert "convert it with `mergekit-sd convert`" not in result.stderr
    table = run_cli("inspect", good)
    assert table.returncode == 0, table.stderr
    assert "SD1.x" in table.stdout and "safe loader" in " ".join(table.stdout.split())
