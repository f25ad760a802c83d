"""Synthetic model files: valid safetensors, the real layouts, tiny shapes that fit together."""

from __future__ import annotations

import json
import math
import re
from itertools import pairwise

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_sd.arch.layouts import load_layout
from mergekit_sd.io.dtypes import safetensors_dtype
from mergekit_sd.io.header import read_header
from mergekit_sd.io.writer import TensorSpec
from mergekit_sd.testing import (
    CHECKPOINT_VARIANTS,
    LORA_BASES,
    LORA_FORMATS,
    checkpoint_specs,
    lora_specs,
    lora_targets,
    make_demo_workspace,
    tiny_dim,
    write_checkpoint,
    write_lora,
)
from mergekit_sd.testing.checkpoints import synthetic_tensor

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"


def shapes(variant: str, size: str = "full") -> dict[str, tuple[int, ...]]:
    return {s.name: s.shape for s in checkpoint_specs(variant, size)}


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", CHECKPOINT_VARIANTS)
def test_tiny_checkpoint_loads_and_has_the_full_key_set(tmp_path, variant):
    path = write_checkpoint(tmp_path / f"{variant}.safetensors", variant)
    tensors = load_file(path)
    full = checkpoint_specs(variant, "full")
    assert set(tensors) == {s.name for s in full}
    for spec in full:
        tensor = tensors[spec.name]
        assert safetensors_dtype(tensor.dtype) == spec.dtype, spec.name
        assert tuple(tensor.shape) == tuple(tiny_dim(d) for d in spec.shape), spec.name
    assert path.stat().st_size < 16 * 2**20
    assert not list(tmp_path.glob("*.partial"))


def test_tiny_rule_keeps_small_dims_and_fused_weights_splittable():
    tiny = shapes("flux-dev", "tiny")
    assert tiny[UNET + "double_blocks.0.img_attn.qkv.weight"] == (144, 48)  # 3 x 48 rows
    assert tiny[UNET + "single_blocks.0.linear1.weight"] == (336, 48)  # 3 x 48 + 192
    assert tiny["vae.decoder.conv_in.weight"] == (16, 16, 3, 3)
    assert shapes("sd1-inpainting", "tiny")[CONV_IN] == (16, 9, 3, 3)


@pytest.mark.parametrize("variant, layout", [
    ("sd1", "sd1-ldm"), ("sdxl", "sdxl-sgm"),
    ("sd3-medium", "sd3-medium-comfyui"), ("flux-dev", "flux1-dev-bfl"),
])
def test_full_size_specs_are_the_layouts_non_optional_keys(variant, layout):
    expected = {k.name: (k.shape, k.dtype) for k in load_layout(layout) if not k.optional}
    got = {s.name: (s.shape, s.dtype) for s in checkpoint_specs(variant, "full")}
    assert got == expected


@pytest.mark.parametrize("variant, base", [
    ("sd1-inpainting", "sd1"), ("sd2-inpainting", "sd2"), ("sdxl-inpainting", "sdxl"),
])
def test_inpainting_unets_take_nine_input_channels(variant, base):
    inpainting, plain = shapes(variant), shapes(base)
    assert inpainting[CONV_IN][1] == 9 and plain[CONV_IN][1] == 4
    assert {k for k in plain if inpainting[k] != plain[k]} == {CONV_IN}


def test_sd2_has_openclip_h_and_1024_wide_cross_attention():
    sd2 = shapes("sd2")
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)
    assert sd2["cond_stage_model.model.token_embedding.weight"] == (49408, 1024)
    last = "cond_stage_model.model.transformer.resblocks.23."
    assert sd2[last + "attn.in_proj_weight"] == (3072, 1024)
    assert sd2[last + "mlp.c_fc.weight"] == (4096, 1024)
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in sd2
    assert sd2[UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert sd2[UNET + "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"] == (320, 1024)
    assert sd2[UNET + "input_blocks.1.1.proj_in.weight"] == (320, 320)  # linear, not 1x1 conv
    assert sd2["first_stage_model.encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)


def test_sdxl_refiner_has_only_openclip_g_as_embedder_zero():
    refiner = shapes("sdxl-refiner")
    assert not any(k.startswith("conditioner.embedders.1.") for k in refiner)
    assert not any(".transformer.text_model." in k for k in refiner)  # no CLIP-L
    assert refiner["conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight"] \
        == (3840, 1280)
    assert refiner["conditioner.embedders.0.model.text_projection"] == (1280, 1280)
    assert refiner[UNET + "label_emb.0.0.weight"] == (1280, 2560)
    assert refiner[CONV_IN] == (384, 4, 3, 3)


def test_sd35_files_match_the_published_key_counts_and_mmdit_x_blocks():
    medium, large = shapes("sd35-medium"), shapes("sd35-large")
    assert len(medium) == 909 and len(large) == 1167  # sd3.5_medium / sd3.5_large.safetensors
    dual = sorted(int(m.group(1)) for k in medium
                  if (m := re.fullmatch(r".*joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight", k)))
    assert dual == list(range(13))
    assert medium[UNET + "joint_blocks.12.x_block.adaLN_modulation.1.weight"] == (9 * 1536, 1536)
    assert medium[UNET + "joint_blocks.13.x_block.adaLN_modulation.1.weight"] == (6 * 1536, 1536)
    assert medium[UNET + "pos_embed"] == (1, 384 * 384, 1536)
    assert large[UNET + "pos_embed"] == (1, 192 * 192, 2432)
    assert large[UNET + "joint_blocks.37.context_block.adaLN_modulation.1.weight"] == (4864, 2432)
    assert large[UNET + "joint_blocks.36.context_block.mlp.fc1.weight"] == (4 * 2432, 2432)
    assert UNET + "joint_blocks.37.context_block.mlp.fc1.weight" not in large
    assert large[UNET + "joint_blocks.0.x_block.attn.ln_q.weight"] == (64,)
    assert not any(k.startswith("text_encoders.") or "attn2" in k for k in large)


def test_flux_variants_differ_where_the_releases_do():
    dev, schnell, fill = shapes("flux-dev"), shapes("flux-schnell"), shapes("flux-fill")
    assert set(dev) - set(schnell) == {UNET + f"guidance_in.{layer}.{p}"
                                       for layer in ("in_layer", "out_layer")
                                       for p in ("weight", "bias")}
    assert dev[UNET + "img_in.weight"] == (3072, 64)
    assert fill[UNET + "img_in.weight"] == (3072, 384)
    transformer = checkpoint_specs("flux-dev-transformer", "full")
    aliases = {k.aliases[0]: k.shape for k in load_layout("flux1-dev-bfl") if k.aliases}
    assert {s.name: s.shape for s in transformer} == aliases
    assert "guidance_in.in_layer.weight" not in shapes("flux-schnell-transformer")


def test_component_files_use_the_bare_names_of_their_folders():
    sd1 = shapes("sd1")
    assert shapes("sd1-unet") == {k[len(UNET):]: v for k, v in sd1.items() if k.startswith(UNET)}
    assert "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in shapes("sdxl-unet")
    assert "joint_blocks.23.x_block.mlp.fc2.weight" in shapes("sd3-medium-transformer")
    vae = shapes("vae-sd")
    assert vae["encoder.down.0.block.0.conv1.weight"] == (128, 128, 3, 3)
    assert vae["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes("vae-flux")["encoder.conv_out.weight"] == (32, 512, 3, 3)
    clip_l, clip_g, t5 = shapes("clip-l"), shapes("clip-g"), shapes("t5xxl")
    assert all(k.startswith("text_model.") for k in clip_l)
    assert clip_l["text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert clip_g["text_model.encoder.layers.31.self_attn.q_proj.weight"] == (1280, 1280)
    assert clip_g["text_projection.weight"] == (1280, 1280)
    assert t5["shared.weight"] == (32128, 4096)
    assert t5["encoder.block.23.layer.1.DenseReluDense.wo.weight"] == (4096, 10240)


def test_sparse_full_sdxl_is_full_size_on_paper_and_takes_no_disk(tmp_path):
    path = write_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", size="full", fill="sparse")
    # every non-optional SDXL key is F32
    data = sum(math.prod(k.shape) * 4 for k in load_layout("sdxl-sgm") if not k.optional)
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
    stat = path.stat()
    assert stat.st_size == 8 + header_length + data
    assert stat.st_size > 6_000_000_000
    assert stat.st_blocks * 512 < 2**20
    assert len(read_header(path).tensors) == 2480  # the offsets tile the file exactly
    with safe_open(path, framework="pt") as f:
        assert not f.get_tensor(UNET + "out.2.bias").any()


def test_same_seed_gives_the_same_bytes_and_another_seed_other_values(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", seed=7)
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", seed=7)
    c = write_checkpoint(tmp_path / "c.safetensors", "sd1", seed=8)
    assert a.read_bytes() == b.read_bytes()
    first, other = load_file(a), load_file(c)
    assert first.keys() == other.keys()
    assert not [k for k in first if torch.equal(first[k], other[k])]
    values = torch.cat([t.flatten() for t in first.values()])
    assert 0.015 < values.std().item() < 0.025  # the scale of trained weights


def test_cast_files_hold_the_same_values_rounded(tmp_path):
    f32 = load_file(write_checkpoint(tmp_path / "f32.safetensors", "sd1"))
    f16 = load_file(write_checkpoint(tmp_path / "f16.safetensors", "sd1", dtype="F16"))
    assert {t.dtype for t in f16.values()} == {torch.float16}
    assert all(torch.equal(f32[k].half(), f16[k]) for k in f32)
    flux = {s.name: s.dtype for s in checkpoint_specs("flux-dev")}
    assert flux[UNET + "img_in.weight"] == "BF16" and flux["vae.encoder.conv_in.weight"] == "F32"
    assert {s.dtype for s in checkpoint_specs("flux-dev", dtype="F16")} == {"F16"}


def test_integer_tensors_count_like_position_ids():
    ids = synthetic_tensor(TensorSpec("position_ids", "I64", (1, 77)), seed=3)
    assert torch.equal(ids, torch.arange(77).reshape(1, 77))


def test_blocks_fraction_keeps_the_first_flux_blocks():
    specs = checkpoint_specs("flux-dev", "full", blocks_fraction=0.25)

    def blocks(kind: str) -> set[int]:
        return {int(m.group(1)) for s in specs if (m := re.search(rf"{kind}\.(\d+)\.", s.name))}

    assert blocks("double_blocks") == set(range(5))
    assert blocks("single_blocks") == set(range(10))
    assert UNET + "final_layer.linear.weight" in {s.name for s in specs}
    with pytest.raises(ValueError, match="FLUX"):
        checkpoint_specs("sdxl", blocks_fraction=0.5)


def test_unknown_names_are_answered_with_the_nearest(tmp_path):
    with pytest.raises(ValueError, match="sdxl-refiner"):
        checkpoint_specs("sdxl-refinr")
    with pytest.raises(ValueError, match="kohya-sdxl"):
        write_lora(tmp_path / "x.safetensors", "kohya_sdxl")
    assert not list(tmp_path.iterdir())


# --- LoRAs ---------------------------------------------------------------------------------------

# Suffix pairs of the (down, up) matrices of the plain low-rank formats.
DOWN_UP = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
           (".lora.down.weight", ".lora.up.weight"),
           (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
           (".down.weight", ".up.weight"))


def delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight delta of one module, computed the way LoRA loaders compute it."""
    t = {k: v.float() for k, v in parts.items()}
    if ".diff" in t:
        return t[".diff"]
    if ".hada_w1_a" in t:
        if ".hada_t1" in t:  # CP form: core [r, r, kh, kw], projections [r, out] and [r, in]
            return math.prod(torch.einsum("ijkl,jr,ip->prkl", t[f".hada_t{i}"], t[f".hada_w{i}_b"],
                                          t[f".hada_w{i}_a"]) for i in (1, 2))
        return (t[".hada_w1_a"] @ t[".hada_w1_b"]) * (t[".hada_w2_a"] @ t[".hada_w2_b"])
    if ".lokr_w2_a" in t or ".lokr_w2" in t:
        w1 = t[".lokr_w1"] if ".lokr_w1" in t else t[".lokr_w1_a"] @ t[".lokr_w1_b"]
        if ".lokr_w2" in t:
            w2 = t[".lokr_w2"]
        elif ".lokr_t2" in t:
            w2 = torch.einsum("ijkl,ip,jr->prkl", t[".lokr_t2"], t[".lokr_w2_a"], t[".lokr_w2_b"])
            w1 = w1[:, :, None, None]
        else:
            w2 = t[".lokr_w2_a"] @ t[".lokr_w2_b"]
        return torch.kron(w1.contiguous(), w2.contiguous())
    for down_suffix, up_suffix in DOWN_UP:
        if down_suffix in t:
            down, up = t[down_suffix], t[up_suffix]
            if ".lora_mid.weight" in t:
                return torch.einsum("or,rshw,si->oihw", up.flatten(1), t[".lora_mid.weight"],
                                    down.flatten(1))
            product = up.flatten(1) @ down.flatten(1)
            return product.reshape(up.shape[0], *down.shape[1:])
    raise AssertionError(f"no known LoRA tensors among {sorted(parts)}")


def check_lora_fits(fmt: str, tensors: dict[str, torch.Tensor], size: str) -> None:
    """Every module's delta has the shape of the weight (or rows) it lands on; nothing is left."""
    base = shapes(LORA_BASES[fmt], size)
    targets = lora_targets(fmt, size)
    by_module: dict[str, dict[str, torch.Tensor]] = {t.module: {} for t in targets}
    for name, tensor in tensors.items():
        module = next((m for m in _prefixes(name) if m in by_module), None)
        assert module is not None, f"{name} belongs to no module"
        by_module[module][name[len(module):]] = tensor
    tiled: dict[str, list[tuple[int, int]]] = {}
    for target in targets:
        parts = by_module[target.module]
        weight = base[target.key]
        expected = weight
        if target.rows is not None:
            tiled.setdefault(target.key, []).append(target.rows)
            expected = (target.rows[1] - target.rows[0], *weight[1:])
        got = tuple(delta(parts).shape)
        flat = (expected[0], math.prod(expected[1:]))  # a conv's delta may come flat
        squeezed = expected[:2] if expected[2:] == (1, 1) else expected  # 1x1 convs as linears
        assert got in (expected, flat, squeezed), (target.module, got, expected)
        if ".alpha" in parts:
            assert parts[".alpha"].dtype == torch.float32 and parts[".alpha"].dim() == 0
        if ".diff_b" in parts:
            assert tuple(parts[".diff_b"].shape) == base[target.bias]
        if ".dora_scale" in parts:
            assert parts[".dora_scale"].shape[0] == expected[0]
    for key, rows in tiled.items():  # the parts of a fused weight cover it exactly once
        edges = sorted(rows)
        assert edges[0][0] == 0 and edges[-1][1] == base[key][0], (key, edges)
        assert all(a[1] == b[0] for a, b in pairwise(edges)), (key, edges)


def _prefixes(name: str):
    """Candidate module names of a tensor name: every dot-boundary prefix, longest first."""
    cut = len(name)
    while (cut := name.rfind(".", 0, cut)) > 0:
        yield name[:cut]


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_tiny_lora_loads_and_fits_the_tiny_checkpoint(tmp_path, fmt):
    path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, rank=4)
    tensors = load_file(path)
    assert set(tensors) == {s.name for s in lora_specs(fmt, 4)}
    check_lora_fits(fmt, tensors, "tiny")
    checkpoint = set(shapes(LORA_BASES[fmt], "tiny"))
    assert all(t.key in checkpoint for t in lora_targets(fmt))


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_full_size_lora_shapes_fit_the_full_checkpoint(fmt):
    meta = {s.name: torch.empty(s.shape, device="meta") for s in lora_specs(fmt, 8, "full")}
    check_lora_fits(fmt, meta, "full")


# One real key name per format (several where a format has distinct kinds of modules).
EXAMPLE_KEYS = {
    "kohya-sd1": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
                  "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight",
                  "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"],
    "kohya-sd2": ["lora_te_text_model_encoder_layers_22_mlp_fc2.lora_up.weight"],
    "kohya-sdxl": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                   "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2.alpha",
                   "lora_unet_output_blocks_0_1_proj_in.lora_up.weight",
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                   "lora_te2_text_model_encoder_layers_30_mlp_fc1.lora_down.weight"],
    "locon-sd1": ["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"],
    "tucker-sd1": ["lora_unet_up_blocks_3_resnets_2_conv2.lora_mid.weight"],
    "loha-sd1": ["lora_unet_mid_block_resnets_1_conv1.hada_t2",
                 "lora_te_text_model_encoder_layers_11_self_attn_out_proj.hada_w2_b"],
    "lokr-sd1": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1",
                 "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1_a",
                 "lora_unet_down_blocks_0_resnets_0_conv1.lokr_t2"],
    "full-diff-sd1": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
                      ".diff_b"],
    "dora-sdxl": ["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_v.dora_scale"],
    "peft-sd1": ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"],
    "peft-sdxl": ["unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.lora_A.weight",
                  "text_encoder_2.text_model.encoder.layers.30.self_attn.v_proj.lora_B.weight"],
    "diffusers-old-sd1": [
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.lora.up.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"],
    "kohya-flux": ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                   "lora_unet_double_blocks_18_img_mlp_0.alpha",
                   "lora_unet_single_blocks_37_linear1.lora_up.weight",
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"],
    "aitoolkit-flux": ["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
                       "diffusion_model.single_blocks.0.linear1.lora_B.weight"],
    "xlabs-flux": ["double_blocks.0.processor.qkv_lora1.down.weight",
                   "double_blocks.18.processor.proj_lora2.up.weight"],
    "diffusers-flux": ["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
                       "transformer.single_transformer_blocks.37.proj_mlp.lora_B.weight",
                       "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"],
    "kohya-sd3": ["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",
                  "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1.alpha"],
    "lycoris-sdxl": ["lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1",
                     "lycoris_mid_block_attentions_0_transformer_blocks_9_ff_net_2.lokr_w1_a",
                     "lycoris_up_blocks_0_attentions_2_transformer_blocks_9_attn2_to_k.alpha"],
}


def test_every_format_has_an_example_and_uses_the_real_key_names():
    assert set(EXAMPLE_KEYS) == set(LORA_FORMATS)
    for fmt, keys in EXAMPLE_KEYS.items():
        names = {s.name for s in lora_specs(fmt)}
        missing = [k for k in keys if k not in names]
        assert not missing, (fmt, missing)
    sd3 = {s.name for s in lora_specs("kohya-sd3")}
    assert "lora_unet_joint_blocks_23_context_block_mlp_fc1.lora_down.weight" not in sd3


def test_full_size_loras_have_the_widths_of_their_base_models():
    def spec(fmt, name):
        return next(s.shape for s in lora_specs(fmt, 8, "full") if s.name == name)

    attn2_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert spec("kohya-sd1", attn2_k + ".lora_down.weight") == (8, 768)
    assert spec("kohya-sd1", attn2_k + ".lora_up.weight") == (640, 8)
    assert spec("kohya-sd2", attn2_k + ".lora_down.weight") == (8, 1024)
    assert spec("kohya-sd1", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight") \
        == (8, 320, 1, 1)
    assert spec("locon-sd1", "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight") \
        == (8, 320, 3, 3)
    assert spec("locon-sd1", "lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight") \
        == (640, 8, 1, 1)
    assert spec("diffusers-flux", "transformer.transformer_blocks.0.attn.to_q.lora_B.weight") \
        == (3072, 8)
    assert spec("diffusers-flux", "transformer.single_transformer_blocks.0.proj_out.lora_A.weight"
                ) == (8, 15360)
    assert spec("xlabs-flux", "double_blocks.0.processor.qkv_lora1.up.weight") == (9216, 8)


def test_coverage_reaches_every_kind_of_block():
    sd1 = {t.key for t in lora_targets("kohya-sd1")}
    for part in ("input_blocks.1.", "input_blocks.8.", "middle_block.", "output_blocks.3.",
                 "output_blocks.11.", "cond_stage_model."):
        assert any(part in k for k in sd1), part
    flux = {t.key for t in lora_targets("diffusers-flux")}
    assert {int(m.group(1)) for k in flux if (m := re.search(r"double_blocks\.(\d+)", k))} \
        == set(range(19))
    assert {int(m.group(1)) for k in flux if (m := re.search(r"single_blocks\.(\d+)", k))} \
        == set(range(38))


def test_kohya_metadata_describes_the_training(tmp_path):
    path = write_lora(tmp_path / "mychar.safetensors", "kohya-sd1", rank=8, alpha=4)
    metadata = read_header(path).metadata
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4")
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == "mychar"
    tags = json.loads(metadata["ss_tag_frequency"])
    assert all(isinstance(n, int) for folder in tags.values() for n in folder.values())
    alphas = [t for k, t in load_file(path).items() if k.endswith(".alpha")]
    assert len(alphas) == 264 and all(a.item() == 4.0 for a in alphas)

    lycoris = read_header(write_lora(tmp_path / "l.safetensors", "loha-sd1")).metadata
    assert lycoris["ss_network_module"] == "lycoris.kohya"
    assert json.loads(lycoris["ss_network_args"])["algo"] == "loha"
    assert read_header(write_lora(tmp_path / "x.safetensors", "kohya-sdxl")).metadata[
        "ss_base_model_version"] == "sdxl_base_v1-0"
    assert read_header(write_lora(tmp_path / "p.safetensors", "peft-sd1")).metadata \
        == {"format": "pt"}
    assert read_header(write_lora(tmp_path / "n.safetensors", "kohya-flux", metadata={})
                       ).metadata == {}


def test_lora_seeds_are_deterministic(tmp_path):
    # one file name in three folders: the name is in the metadata (ss_output_name)
    a, b, c = (write_lora(tmp_path / folder / "style.safetensors", "lokr-sd1", seed=seed)
               for folder, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


# --- the demo workspace --------------------------------------------------------------------------


def test_demo_workspace_is_created_once_and_repaired_when_damaged(tmp_path):
    paths = make_demo_workspace(tmp_path)
    relative = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert relative == sorted([
        "models/Stable-diffusion/demo-sd15-base.safetensors",
        "models/Stable-diffusion/demo-sd15-anime.safetensors",
        "models/Stable-diffusion/demo-sd15-photo.safetensors",
        "models/Stable-diffusion/demo-sdxl-base.safetensors",
        "models/Lora/demo-lora-mychar.safetensors",
        "models/Lora/demo-loha-style.safetensors",
        "models/VAE/demo-vae-sd.safetensors",
    ])
    headers = {p.name: read_header(p) for p in paths}
    sd15 = [p for p in paths if p.name.startswith("demo-sd15")]
    assert len({headers[p.name].metadata["modelspec.title"] for p in sd15}) == 3
    assert len({p.read_bytes() for p in sd15}) == 3  # three different models, same keys
    assert len({tuple(headers[p.name].tensors) for p in sd15}) == 1

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}
    assert make_demo_workspace(tmp_path) == paths
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths} == before

    paths[0].write_bytes(b"not a model")
    make_demo_workspace(tmp_path)
    assert paths[0].read_bytes() == before[paths[0]][1]
    assert not list(tmp_path.rglob("*.partial"))


def test_demo_workspace_where_it_cannot_be_written_is_one_sentence(tmp_path):
    from conftest import run_cli

    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli("demo-workspace", tmp_path / "a-file" / "ws")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'a-file'}") and \
        "the demo workspace cannot be written there" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_demo_workspace_refuses_a_folder_of_the_users_unless_overwrite(tmp_path):
    """A web UI's folder (models of the user's, one named like a demo model) is left alone
    with one sentence; --overwrite puts the demo beside them."""
    from conftest import run_cli

    webui = tmp_path / "webui"
    checkpoints = webui / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mine.safetensors").write_bytes(b"mine")
    (checkpoints / "demo-sd15-base.safetensors").write_bytes(b"also mine")
    result = run_cli("demo-workspace", webui)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {webui}: holds files that are not the demo's (")
    assert "pass --overwrite" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in webui.rglob("*")) == [
        "Stable-diffusion", "demo-sd15-base.safetensors", "mine.safetensors", "models"]
    assert (checkpoints / "demo-sd15-base.safetensors").read_bytes() == b"also mine"

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk")
    assert run_cli("demo-workspace", notes).returncode == 2
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]

    made = make_demo_workspace(webui, overwrite=True)
    assert (checkpoints / "mine.safetensors").read_bytes() == b"mine"
    assert read_header(checkpoints / "demo-sd15-base.safetensors").tensors
    assert len(made) == 7


def test_demo_workspace_is_refreshed_whatever_make_demo_wrote_into_it(tmp_path):
    ws = tmp_path / "demo-workspace"
    paths = make_demo_workspace(ws)
    (ws / "merges").mkdir()
    (ws / "merges" / "demo-mix@alpha=0.3.safetensors").write_bytes(paths[0].read_bytes())
    (ws / "catalog.sqlite").write_bytes(b"SQLite format 3\0")
    paths[1].write_bytes(b"damaged")
    assert make_demo_workspace(ws) == paths
    assert read_header(paths[1]).tensors
    # one made before demo workspaces were marked: its models/ holds only demo models
    (ws / ".mergekit-sd-demo").unlink()
    assert make_demo_workspace(ws) == paths
    assert (ws / ".mergekit-sd-demo").is_file()
