"""Configs derived from checkpoint shapes: the released configs for full-size layouts, and models
whose every parameter fits the file (SD1, SDXL, FLUX.1, SD3), built on the meta device."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from mergekit_sd.io.header import read_header  # noqa: E402
from mergekit_sd.render import configs  # noqa: E402
from mergekit_sd.render.components import build_modules  # noqa: E402
from mergekit_sd.render.layout import checkpoint_layout  # noqa: E402
from mergekit_sd.render.weights import WeightTable  # noqa: E402
from mergekit_sd.testing.checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Full-size layouts as sparse files: real shapes, no data (headers are all that is read)."""
    folder = tmp_path_factory.mktemp("full-layouts")

    def layout(variant: str):
        path = folder / f"{variant}.safetensors"
        if not path.exists():
            write_checkpoint(path, variant, size="full", fill="sparse")
        return checkpoint_layout(read_header(path))

    return layout


@pytest.mark.parametrize("variant", ["sd1", "sdxl", "flux-schnell", "sd3-medium"])
def test_the_derived_models_take_every_weight_of_the_release_layout(full, variant):
    layout = full(variant)
    modules, _ = build_modules(layout)
    table = WeightTable(modules, layout.maps, layout.key_shapes)
    assert table.mismatched == []
    assert table.required_missing() == {}
    assert all(p.is_meta for m in modules.values() for p in m.parameters())


def test_sd1_gets_the_released_unet_and_vae_configs(full):
    layout = full("sd1")
    unet = configs.unet_config(layout)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["attention_head_dim"] == [8, 8, 8, 8]
    assert (unet["cross_attention_dim"], unet["layers_per_block"], unet["norm_num_groups"],
            unet["time_embedding_dim"], unet["use_linear_projection"]) == (768, 2, 32, 1280,
                                                                         False)
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    vae = configs.vae_config(layout)
    assert (vae["block_out_channels"], vae["latent_channels"], vae["scaling_factor"]) == (
        [128, 256, 512, 512], 4, 0.18215)


def test_sdxl_gets_its_head_widths_depths_and_size_conditioning(full):
    layout = full("sdxl")
    unet = configs.unet_config(layout, pooled_width=1280)
    assert unet["attention_head_dim"] == [5, 10, 20]
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert (unet["cross_attention_dim"], unet["addition_time_embed_dim"],
            unet["projection_class_embeddings_input_dim"]) == (2048, 256, 2816)
    clip_g = configs.clip_config(layout, "text_encoder_2", {})
    assert (clip_g["num_attention_heads"], clip_g["hidden_act"], clip_g["projection_dim"]) == (
        20, "gelu", 1280)
    assert configs.clip_config(layout, "text_encoder", {})["hidden_act"] == "quick_gelu"


def test_flux_and_sd3_transformers_and_t5_get_the_released_settings(full):
    flux = configs.flux_config(full("flux-schnell"))
    assert {k: flux[k] for k in ("num_layers", "num_single_layers", "num_attention_heads",
                                 "attention_head_dim", "joint_attention_dim",
                                 "pooled_projection_dim", "guidance_embeds")} == {
        "num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24,
        "attention_head_dim": 128, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": False}
    sd3_layout = full("sd3-medium")
    sd3 = configs.sd3_config(sd3_layout)
    assert (sd3["num_layers"], sd3["num_attention_heads"], sd3["pos_embed_max_size"],
            sd3["pooled_projection_dim"], sd3["dual_attention_layers"], sd3["qk_norm"]) == (
        24, 24, 192, 2048, (), None)
    t5 = configs.t5_config(sd3_layout, "text_encoder_3")
    assert (t5["d_model"], t5["num_heads"], t5["d_kv"], t5["d_ff"], t5["num_layers"]) == (
        4096, 64, 64, 10240, 24)


@pytest.mark.parametrize(("width", "standard", "heads"), [
    (320, 8, 8), (1280, 20, 20), (20, 8, 5), (16, 1, 1), (30, 8, 6)])
def test_head_counts_divide_the_width(width, standard, heads):
    assert configs.head_count(width, standard) == heads


def test_a_weight_the_config_is_read_from_missing_is_one_sentence(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    save_file({k: t for k, t in load_file(path).items() if "input_blocks.1.1.proj_in" not in k},
              tmp_path / "pruned.safetensors")
    layout = checkpoint_layout(read_header(tmp_path / "pruned.safetensors"))
    with pytest.raises(configs.UnfitShapes, match=(
            r"^pruned.safetensors: its unet has no down_blocks.0.attentions.0.proj_in.weight; "
            r"it cannot be rendered as SD1.x$")):
        configs.unet_config(layout)


@pytest.mark.parametrize(("kind", "files"), [
    ("clip", {"vocab.json": "{}", "merges.txt": "\n"}),
    ("t5", {"tokenizer.json": '{"model": {"type": "BPE", "vocab": {}, "merges": {}}}'}),
])
def test_a_malformed_tokenizer_in_config_dir_is_one_sentence(tmp_path, kind, files):
    from mergekit_sd.errors import UserError
    from mergekit_sd.render.assets import load_tokenizer

    component = "text_encoder" if kind == "clip" else "text_encoder_3"
    folder = tmp_path / ("tokenizer" if kind == "clip" else "tokenizer_3")
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(UserError, match=rf"^{folder}: could not be read as a {kind.upper()} "
                                        rf"tokenizer \(.*\); give the {folder.name}/ folder of "
                                        "a diffusers-format model$"):
        load_tokenizer("sd3", component, kind, 32128, config_dir=tmp_path)
