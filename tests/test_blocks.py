"""Block maps of every architecture, checked against the real key layouts."""

from __future__ import annotations

import pytest

from mergekit_sd.arch.architectures import ARCHITECTURES, block_counts, get_architecture
from mergekit_sd.arch.layouts import load_layout
from mergekit_sd.block_report import keys_of, sgm_unet_block_keys

PREFIX = "model.diffusion_model."


def layout_keys(name):
    return [k.name for k in load_layout(name) if not k.optional]


@pytest.mark.parametrize("arch_id, layout, first, last", [
    ("sd1", "sd1-ldm", "IN00", "OUT11"),
    ("sdxl", "sdxl-sgm", "IN00", "OUT08"),
    ("flux-dev", "flux1-dev-bfl", "D00", "S37"),
    ("sd3-medium", "sd3-medium-comfyui", "J00", "J23"),
])
def test_every_named_block_has_keys_and_nothing_falls_outside(arch_id, layout, first, last):
    arch = ARCHITECTURES[arch_id]
    counts = block_counts(arch, layout_keys(layout), PREFIX)
    assert set(counts) == set(arch.blocks), "a key landed in a block the architecture lacks"
    assert all(counts[b] > 0 for b in arch.blocks), {b: n for b, n in counts.items() if not n}
    assert arch.blocks[1] == first and arch.blocks[-1] == last


def test_sd1_conventions_follow_automatic1111_block_weights():
    sd1 = ARCHITECTURES["sd1"]
    assert sd1.block_of("time_embed.0.weight") == "IN00"
    assert sd1.block_of("input_blocks.4.1.proj_in.weight") == "IN04"
    assert sd1.block_of("middle_block.1.norm.weight") == "M00"
    assert sd1.block_of("output_blocks.11.1.proj_out.weight") == "OUT11"
    assert sd1.block_of("out.2.weight") == "OUT11"
    assert ARCHITECTURES["sdxl"].block_of("out.0.weight") == "OUT08"
    assert ARCHITECTURES["sdxl"].block_of("label_emb.0.0.weight") == "IN00"


def test_flux_blocks_in_bare_and_prefixed_files():
    flux = ARCHITECTURES["flux-dev"]
    assert flux.block_of("double_blocks.18.img_mlp.0.weight") == "D18"
    assert flux.block_of("single_blocks.0.linear1.weight") == "S00"
    assert flux.block_of("img_in.weight") == "BASE"
    bare = [a for k in load_layout("flux1-dev-bfl") for a in k.aliases]
    counts = block_counts(flux, bare, "")
    assert counts["D00"] == block_counts(flux, layout_keys("flux1-dev-bfl"), PREFIX)["D00"]


def test_unknown_architecture_names_the_nearest():
    with pytest.raises(KeyError, match="did you mean 'sdxl'"):
        get_architecture("sdxk")
    assert get_architecture("SD15").id == "sd1"
    assert get_architecture("pony").id == "sdxl"


def test_blocks_command_for_a_name_and_for_a_file(tmp_path):
    from conftest import run_cli

    from mergekit_sd.testing import write_checkpoint

    by_name = run_cli("blocks", "flux-schnell")
    assert by_name.returncode == 0 and "S37" in by_name.stdout and "D18" in by_name.stdout
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1")
    by_file = run_cli("blocks", path)
    assert by_file.returncode == 0 and "OUT11" in by_file.stdout
    wrong = run_cli("blocks", "sdxk")
    assert wrong.returncode == 2 and "did you mean 'sdxl'" in wrong.stderr


def test_the_unet_block_builder_gives_sdxl_base_its_real_keys():
    numbered = {k[len(PREFIX):] for k in layout_keys("sdxl-sgm")
                if k.startswith(tuple(PREFIX + n for n in ("input_blocks.", "middle_block.",
                                                           "output_blocks.")))}
    built = sgm_unet_block_keys((1, 2, 4), (0, 2, 10), 10)
    assert len(built) == len(set(built)) and set(built) == numbered


def test_sdxl_refiner_blocks_follow_its_four_level_unet():
    arch_id, keys, prefix, _ = keys_of("sdxl-refiner")
    counts = block_counts(ARCHITECTURES[arch_id], keys, prefix)
    assert all(counts[b] > 0 for b in ARCHITECTURES[arch_id].blocks), counts
    # a downsample; res blocks without attention; a res block and a 4-deep transformer
    assert (counts["IN09"], counts["IN10"], counts["IN11"], counts["IN05"]) == (2, 10, 10, 96)
    assert (counts["M00"], counts["OUT02"], counts["OUT11"]) == (106, 14, 16)
