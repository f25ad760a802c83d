"""A family's models built from the checkpoint's own configs (on the meta device: no memory, no
random init), and the tokenizers that go with them."""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.render import configs
from mergekit_sd.render.assets import load_tokenizer
from mergekit_sd.render.layout import CheckpointLayout
from mergekit_sd.render.tiny_fit import fit_unet
from mergekit_sd.render.weights import empty_parameters

# text encoder component -> tokenizer kind, per family
TEXT_ENCODERS = {
    "sd1": {"text_encoder": "clip"},
    "sdxl": {"text_encoder": "clip", "text_encoder_2": "clip"},
    "sd3": {"text_encoder": "clip", "text_encoder_2": "clip", "text_encoder_3": "t5"},
    "flux": {"text_encoder": "clip", "text_encoder_2": "t5"},
}
# CLIP's released vocabulary puts its special tokens here; the tokenizer's own win when known
_CLIP_SPECIAL = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def _vocab(layout: CheckpointLayout, component: str, kind: str) -> int:
    name = "text_model.embeddings.token_embedding.weight" if kind == "clip" else "shared.weight"
    return layout.shape(component, name)[0]


def load_tokenizers(layout: CheckpointLayout, config_dir: Path | None = None) -> dict:
    """component -> tokenizer, for every text encoder of the family."""
    return {component: load_tokenizer(layout.family, component, kind,
                                      _vocab(layout, component, kind), config_dir)
            for component, kind in TEXT_ENCODERS[layout.family].items()}


def _clip(layout: CheckpointLayout, component: str, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(_CLIP_SPECIAL) if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    config = CLIPTextConfig(**configs.clip_config(layout, component, special))
    if tokenizer is not None:
        tokenizer.model_max_length = config.max_position_embeddings
    cls = (CLIPTextModelWithProjection if configs.pools_projection(layout.family, component)
           else CLIPTextModel)
    return cls(config)


def _t5(layout: CheckpointLayout, component: str):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**configs.t5_config(layout, component)))


def _diffusion_model(layout: CheckpointLayout, pooled_width: int | None):
    """(the UNet or transformer, the width of the text features it attends to)."""
    if layout.family == "flux":
        from diffusers import FluxTransformer2DModel

        config = configs.flux_config(layout)
        return FluxTransformer2DModel(**config), config["joint_attention_dim"]
    if layout.family == "sd3":
        from diffusers import SD3Transformer2DModel

        config = configs.sd3_config(layout)
        return SD3Transformer2DModel(**config), config["joint_attention_dim"]
    from diffusers import UNet2DConditionModel

    config = configs.unet_config(layout, pooled_width)
    unet = UNet2DConditionModel(**config)
    fit_unet(unet, layout)
    return unet, config["cross_attention_dim"]


def build_modules(layout: CheckpointLayout, tokenizers: dict | None = None
                  ) -> tuple[dict[str, object], int]:
    """(component -> model with meta parameters, the diffusion model's text width).
    Without `tokenizers`, CLIP's released special token ids are assumed."""
    from diffusers import AutoencoderKL

    tokenizers = tokenizers or {}
    modules: dict[str, object] = {}
    with empty_parameters():
        for component, kind in TEXT_ENCODERS[layout.family].items():
            modules[component] = (_clip(layout, component, tokenizers.get(component))
                                  if kind == "clip" else _t5(layout, component))
        pooled = modules["text_encoder_2"].config.projection_dim \
            if layout.family == "sdxl" else None
        name = "unet" if layout.family in ("sd1", "sdxl") else "transformer"
        modules[name], context_width = _diffusion_model(layout, pooled)
        modules["vae"] = AutoencoderKL(**configs.vae_config(layout))
    return modules, context_width
