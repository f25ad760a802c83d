"""Oracle: our bake agrees with diffusers' own load_lora_weights + fuse_lora.

A tiny SD1 and a tiny SDXL checkpoint in the real ldm/sgm layouts are loaded into real diffusers
pipelines through diffusers' own single-file converters; diffusers then loads and fuses a kohya
LoRA and a PEFT LoRA. The same LoRAs baked by us into the checkpoint, converted by the same
converters, must give the same UNet and text-encoder weights.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from mergekit_sd.arch.keymap import diffusers_key_maps  # noqa: E402
from mergekit_sd.arch.layouts import load_layout  # noqa: E402
from mergekit_sd.lora.bake import LoraUse, plan_bake  # noqa: E402
from mergekit_sd.lora.bake_run import run_bake  # noqa: E402

MAX_RELATIVE_ERROR = 1e-5
_LAYOUTS = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}


def to_single_file(pipe, components: tuple[str, ...], layout: str) -> dict:
    """The pipeline's weights under the real single-file key names of `layout`: the key maps of
    the full-size layout (derived from diffusers' converters) say which checkpoint key, and
    which rows of it, each diffusers parameter is; pieces of one key are put back in row order.
    Loading the result with diffusers' converters must give the pipeline back (checked)."""
    layout_keys = load_layout(layout)
    full = {e.name: e.shape for e in layout_keys}
    maps = diffusers_key_maps(full)
    pieces: dict[str, list] = {}
    for component in components:
        mapping = maps[component]
        for name, tensor in getattr(pipe, component).state_dict().items():
            source = mapping.get(name) or mapping.get("text_model." + name)
            if source is None:
                assert "position_ids" in name, name
                continue
            if source.transposed:
                tensor = tensor.T
            for seg in source.segments:  # one segment each here: nothing is concatenated
                pieces.setdefault(seg.key, []).append((seg.start, tensor))
    state = {}
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        tensor = torch.cat([t for _, t in parts]) if len(parts) > 1 else parts[0][1]
        ndim = len(full[key])
        state[key] = tensor.reshape(*tensor.shape, *([1] * (ndim - tensor.ndim))).contiguous()
    return state


def _clip(hidden: int, projection: bool = False):
    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2,
                            intermediate_size=2 * hidden, num_attention_heads=4,
                            max_position_embeddings=8, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=2,
                         down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4)


def _randomise(*modules) -> None:
    """Trained-looking values everywhere (fresh modules have zeros and ones in places)."""
    generator = torch.Generator().manual_seed(7)
    for module in modules:
        for p in module.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.05


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(steps_offset=1, clip_sample=False)  # unused: no image is rendered


def sd1_pipeline() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(block_out_channels=[32, 32, 64, 64], layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                                sample_size=8)
    te, vae = _clip(32), _vae()
    _randomise(unet, te, vae)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=[32, 32, 64], layers_per_block=2, cross_attention_dim=64,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 2], attention_head_dim=[4, 4, 4], norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8)
    te1, te2, vae = _clip(32), _clip(32, projection=True), _vae()
    _randomise(unet, te1, te2, vae)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=_scheduler())


def load_single_file(pipe, state: dict):
    """diffusers' own converters, from the single-file keys back into `pipe`'s modules."""
    _load(pipe.unet, sfu.convert_ldm_unet_checkpoint(state, pipe.unet.config))
    _load(pipe.vae, sfu.convert_ldm_vae_checkpoint(state, pipe.vae.config))
    _load(pipe.text_encoder, _without_text_model(sfu.convert_ldm_clip_checkpoint(state),
                                                 pipe.text_encoder))
    if getattr(pipe, "text_encoder_2", None) is not None:
        _load(pipe.text_encoder_2, sfu.convert_open_clip_checkpoint(
            pipe.text_encoder_2, state, prefix="conditioner.embedders.1.model."))
    return pipe


def _load(module, state: dict) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    assert not [m for m in missing if "position_ids" not in m], missing[:5]


def _without_text_model(state: dict, model) -> dict:
    """transformers 5's CLIPTextModel has no text_model. level; the converter writes it."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _weights(pipe, names: tuple[str, ...]) -> dict:
    return {f"{n}.{k}": v.detach().clone() for n in names
            for k, v in getattr(pipe, n).state_dict().items()}


def _assert_same(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        scale = expected.abs().max().clamp_min(1e-12)
        error = ((ours[key] - expected).abs().max() / scale).item()
        assert error <= MAX_RELATIVE_ERROR, f"{key}: relative error {error:.2e}"


COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
BUILD = {"sd1": sd1_pipeline, "sdxl": sdxl_pipeline}
CASES = [("sd1", "kohya-sd1"), ("sd1", "peft-sd1"), ("sdxl", "kohya-sdxl"), ("sdxl", "peft-sdxl")]


@pytest.mark.parametrize(("variant", "fmt"), CASES, ids=[c[1] for c in CASES])
def test_bake_matches_diffusers_fuse_lora(tmp_path, variant, fmt):
    components = COMPONENTS[variant]
    pipe = BUILD[variant]()
    original = _weights(pipe, components)
    base = tmp_path / "base.safetensors"
    save_file(to_single_file(pipe, components, _LAYOUTS[variant]), base)
    # the single file is the pipeline: diffusers' converters give every weight back
    assert _weights(load_single_file(BUILD[variant](), load_file(base)), components).keys() \
        == original.keys()
    _assert_same(_weights(load_single_file(BUILD[variant](), load_file(base)), components),
                 original)

    lora = tmp_path / "lora.safetensors"
    save_file(_lora_for(pipe, fmt), lora, metadata={"format": "pt"})
    strength = 0.7
    reference = load_single_file(BUILD[variant](), load_file(base))
    reference.load_lora_weights(str(lora))
    reference.fuse_lora(components=[c for c in components if c != "vae"], lora_scale=strength)
    reference.unload_lora_weights()  # the fused weights stay; the adapters go
    theirs = _weights(reference, components)

    baked = run_bake(plan_bake(base, [LoraUse(str(lora), lora, strength)],
                               tmp_path / "baked.safetensors"))
    ours = _weights(load_single_file(BUILD[variant](), load_file(baked)), components)
    _assert_same(ours, theirs)
    touched = {k.split(".")[0] for k in theirs if not torch.equal(theirs[k], original[k])}
    assert touched == set(components) - {"vae"}  # the LoRA changed the UNet and every encoder


def _lora_for(pipe, fmt: str) -> dict:
    """A LoRA on every attention projection of the UNet and every text encoder, in kohya's or
    PEFT's naming, with alpha != rank so the scale matters."""
    generator = torch.Generator().manual_seed(11)
    rank, alpha = 4, 2.0
    tensors = {}
    sgm = fmt.endswith("sdxl")
    te_names = {"text_encoder": "lora_te1" if sgm else "lora_te", "text_encoder_2": "lora_te2"}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        leaves = ("to_q", "to_k", "to_v", "to_out.0") if component == "unet" else \
            ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
        for path, layer in module.named_modules():
            if not path.endswith(leaves) or not isinstance(layer, torch.nn.Linear):
                continue
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.1
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.1
            if fmt.startswith("peft"):
                name = f"{component}.{path}" if component == "unet" else \
                    f"{component}.text_model.{path.removeprefix('text_model.')}"
                tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
                continue
            if component == "unet":
                name = "lora_unet_" + (_sgm_name(pipe, path) if sgm else path.replace(".", "_"))
            else:
                name = f"{te_names[component]}_text_model_" + \
                    path.removeprefix("text_model.").replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def _sgm_name(pipe, path: str) -> str:
    """kohya's SDXL LoRAs name the UNet in sgm's own layout (sd-scripts trains that model)."""
    maps = diffusers_key_maps({e.name: e.shape for e in load_layout("sdxl-sgm")})
    key = maps["unet"][path + ".weight"].segments[0].key
    return key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")


def test_bake_of_a_diffusers_saved_peft_lora_with_alpha_unlike_its_rank(tmp_path):
    """diffusers' own save_lora_weights stores PEFT's config flat (`unet.lora_alpha`,
    `unet.r`, ...); lora_alpha 16 on rank 4 scales the delta by 4, for diffusers and for us."""
    from peft import LoraConfig

    components = COMPONENTS["sd1"]
    pipe = BUILD["sd1"]()
    base = tmp_path / "base.safetensors"
    save_file(to_single_file(pipe, components, _LAYOUTS["sd1"]), base)
    peft_lora = _lora_for(pipe, "peft-sd1")
    layers = {c: {k[len(c) + 1:]: v for k, v in peft_lora.items() if k.split(".")[0] == c}
              for c in ("unet", "text_encoder")}
    leaves = {"unet": ["to_q", "to_k", "to_v", "to_out.0"],  # those `_lora_for` trains
              "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    config = {c: LoraConfig(r=4, lora_alpha=16, target_modules=leaves[c]).to_dict()
              for c in layers}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=config["unet"],
        text_encoder_lora_adapter_metadata=config["text_encoder"], weight_name="lora.safetensors")
    lora = tmp_path / "lora.safetensors"
    strength = 0.7
    reference = load_single_file(BUILD["sd1"](), load_file(base))
    reference.load_lora_weights(str(lora))
    reference.fuse_lora(components=["unet", "text_encoder"], lora_scale=strength)
    reference.unload_lora_weights()

    baked = run_bake(plan_bake(base, [LoraUse(str(lora), lora, strength)],
                               tmp_path / "baked.safetensors"))
    ours = _weights(load_single_file(BUILD["sd1"](), load_file(baked)), components)
    _assert_same(ours, _weights(reference, components))
