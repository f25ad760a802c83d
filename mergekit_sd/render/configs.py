"""Component configs (UNet, VAE, CLIP text encoders) derived from the checkpoint's own shapes.

Widths, depths, block types and embedding sizes are read from the diffusers-named shapes, so any
checkpoint of a known layout (a full-size release, a pruned finetune, a tiny test model) gets a
config that fits it exactly. diffusers' `create_unet_diffusers_config_from_ldm` is not used: it
assumes the released channel ratios (and recognises SDXL by its 2048-wide context), which the
tiny test models do not keep.

What shapes cannot tell is set by a rule per family:
  attention heads  SD1: 8 heads (the released configs); SDXL and the CLIP encoders: 64-wide
                   heads. Widths these do not divide (tiny models only) take the largest
                   divisor of the width not above that count.
  activations      OpenAI CLIP-L: quick_gelu; OpenCLIP-G: gelu.
  VAE scaling      SD1 0.18215; SDXL 0.13025.
  norm groups      32, or the largest count dividing every width (tiny models only).
"""

from __future__ import annotations

import math

from mergekit_sd.errors import UserError
from mergekit_sd.render.layout import FAMILY_LABELS, CheckpointLayout

_GROUPS = 32
_HEAD_WIDTH = 64
_SD1_HEADS = 8
VAE_SCALING = {"sd1": {"scaling_factor": 0.18215},
               "sdxl": {"scaling_factor": 0.13025},
               "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
               "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159}}


class UnfitShapes(UserError):
    """A checkpoint whose shapes no config of its family can take."""

    def __init__(self, layout: CheckpointLayout, problem: str):
        super().__init__(f"{layout.name}: {problem}; it cannot be rendered as "
                         f"{FAMILY_LABELS[layout.family]}")


def head_count(width: int, standard: int) -> int:
    """`standard` heads when they divide `width`, else the largest divisor below it."""
    for heads in range(max(1, min(standard, width)), 0, -1):
        if width % heads == 0:
            return heads
    return 1


def norm_groups(widths: list[int]) -> int:
    return math.gcd(_GROUPS, *widths)


def _shape(layout: CheckpointLayout, component: str, name: str) -> tuple[int, ...]:
    """The shape of a weight the config is read from; a file without it (pruned, damaged)
    cannot be rendered, which is one sentence rather than a TypeError further on."""
    shape = layout.shape(component, name)
    if shape is None:
        raise UnfitShapes(layout, f"its {component} has no {name}")
    return shape


def _rows(layout: CheckpointLayout, component: str, name: str) -> int:
    return _shape(layout, component, name)[0]


# --- UNet (SD1, SDXL) ----------------------------------------------------------------------------


def unet_config(layout: CheckpointLayout, pooled_width: int | None = None) -> dict:
    """UNet2DConditionModel settings for the file's UNet. `pooled_width` is the pooled text
    embedding's width (SDXL's text_encoder_2 projection), from which SDXL's size-conditioning
    width follows: add_embedding input = pooled + 6 x time embedding."""
    c = "unet"
    levels = layout.count(c, "down_blocks.")
    widths = [_rows(layout, c, f"down_blocks.{i}.resnets.0.conv1.weight") for i in range(levels)]

    def attends(stem: str, i: int) -> bool:
        return bool(layout.names(c, f"{stem}.{i}.attentions."))

    def depth(i: int) -> int:
        return layout.count(c, f"down_blocks.{i}.attentions.0.transformer_blocks.") or 1

    first_attention = next((i for i in range(levels) if attends("down_blocks", i)), None)
    if first_attention is None:
        raise UnfitShapes(layout, "its UNet has no attention blocks")
    stem = f"down_blocks.{first_attention}.attentions.0."
    proj_in = _shape(layout, c, stem + "proj_in.weight")
    config = {
        "in_channels": _shape(layout, c, "conv_in.weight")[1],
        "out_channels": _rows(layout, c, "conv_out.weight"),
        "block_out_channels": widths,
        "layers_per_block": layout.count(c, "down_blocks.0.resnets."),
        "down_block_types": ["CrossAttnDownBlock2D" if attends("down_blocks", i)
                             else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["CrossAttnUpBlock2D" if attends("up_blocks", i)
                           else "UpBlock2D" for i in range(levels)],
        "transformer_layers_per_block": [depth(i) for i in range(levels)],
        "cross_attention_dim": _shape(
            layout, c, stem + "transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(proj_in) == 2,
        "norm_num_groups": norm_groups(widths),
        "time_embedding_dim": _rows(layout, c, "time_embedding.linear_1.weight"),
        "attention_head_dim": [head_count(w, _standard_heads(layout.family, w))
                               for w in widths],
        "sample_size": 128 if layout.family == "sdxl" else 64,
    }
    add_embedding = layout.shape(c, "add_embedding.linear_1.weight")
    if add_embedding is not None:
        if pooled_width is None:
            raise UnfitShapes(layout, "its UNet takes SDXL's size conditioning but there is "
                                      "no pooled text encoder")
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=add_embedding[1],
                      addition_time_embed_dim=(add_embedding[1] - pooled_width) // 6)
    return config


def _standard_heads(family: str, width: int) -> int:
    return _SD1_HEADS if family == "sd1" else max(1, width // _HEAD_WIDTH)


# --- VAE -----------------------------------------------------------------------------------------


def vae_config(layout: CheckpointLayout) -> dict:
    c = "vae"
    levels = layout.count(c, "encoder.down_blocks.")
    widths = [_rows(layout, c, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")
              for i in range(levels)]
    names = set(layout.names(c))
    return {
        "in_channels": _shape(layout, c, "encoder.conv_in.weight")[1],
        "out_channels": _rows(layout, c, "decoder.conv_out.weight"),
        "latent_channels": _shape(layout, c, "decoder.conv_in.weight")[1],
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": layout.count(c, "encoder.down_blocks.0.resnets."),
        "norm_num_groups": norm_groups(widths),
        "use_quant_conv": "quant_conv.weight" in names,
        "use_post_quant_conv": "post_quant_conv.weight" in names,
        "sample_size": 1024 if layout.family != "sd1" else 512,
        # SDXL's VAE overflows in fp16: diffusers decodes in fp32 when this is set
        "force_upcast": layout.family in ("sd1", "sdxl"),
        **VAE_SCALING[layout.family],
    }


# --- CLIP text encoders --------------------------------------------------------------------------

# which text encoders are OpenCLIP (gelu) rather than OpenAI CLIP (quick_gelu), per family
_OPEN_CLIP = {("sdxl", "text_encoder_2"), ("sd3", "text_encoder_2")}


def clip_config(layout: CheckpointLayout, component: str, special_tokens: dict[str, int]
                ) -> dict:
    """CLIPTextConfig settings; `special_tokens` (bos/eos/pad ids) come from the tokenizer, as
    the pooled output is read at the end-of-text token."""
    c = component
    vocab, width = _shape(layout, c, "text_model.embeddings.token_embedding.weight")
    config = {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": _rows(layout, c, "text_model.encoder.layers.0.mlp.fc1.weight"),
        "num_hidden_layers": layout.count(c, "text_model.encoder.layers."),
        "num_attention_heads": head_count(width, max(1, width // _HEAD_WIDTH)),
        "max_position_embeddings": _rows(layout, c,
                                         "text_model.embeddings.position_embedding.weight"),
        "hidden_act": "gelu" if (layout.family, c) in _OPEN_CLIP else "quick_gelu",
        **special_tokens,
    }
    projection = layout.shape(c, "text_projection.weight")
    config["projection_dim"] = projection[0] if projection is not None else width
    return config


# text encoders whose projected pooled output the pipeline uses (a CLIPTextModelWithProjection)
_POOLS_PROJECTION = {("sdxl", "text_encoder_2"), ("sd3", "text_encoder"),
                     ("sd3", "text_encoder_2")}


def pools_projection(family: str, component: str) -> bool:
    return (family, component) in _POOLS_PROJECTION


# --- FLUX.1 and SD3 transformers, T5 -------------------------------------------------------------

# FLUX.1's rotary position embedding splits each 128-wide head into (index, row, column) parts;
# the model only exists with that head width.
_FLUX_ROPE_AXES = {128: (16, 56, 56)}


def flux_config(layout: CheckpointLayout) -> dict:
    c = "transformer"
    width = _rows(layout, c, "x_embedder.weight")
    head = _rows(layout, c, "transformer_blocks.0.attn.norm_q.weight")
    if head not in _FLUX_ROPE_AXES:
        raise UnfitShapes(layout, f"its attention heads are {head} wide and FLUX.1's rotary "
                                  "embedding is defined for 128")
    return {
        "in_channels": _shape(layout, c, "x_embedder.weight")[1],
        "num_layers": layout.count(c, "transformer_blocks."),
        "num_single_layers": layout.count(c, "single_transformer_blocks."),
        "attention_head_dim": head,
        "num_attention_heads": width // head,
        "joint_attention_dim": _shape(layout, c, "context_embedder.weight")[1],
        "pooled_projection_dim": _shape(
            layout, c, "time_text_embed.text_embedder.linear_1.weight")[1],
        "guidance_embeds": bool(layout.names(c, "time_text_embed.guidance_embedder.")),
        "axes_dims_rope": _FLUX_ROPE_AXES[head],
    }


def sd3_config(layout: CheckpointLayout) -> dict:
    c = "transformer"
    width = _rows(layout, c, "pos_embed.proj.weight")
    patch = _shape(layout, c, "pos_embed.proj.weight")
    tokens = _shape(layout, c, "pos_embed.pos_embed")[1]
    layers = layout.count(c, "transformer_blocks.")
    if width % _HEAD_WIDTH:
        raise UnfitShapes(layout, f"its width {width} is no whole number of SD3's 64-wide "
                                  "attention heads")
    return {
        "sample_size": 128,
        "patch_size": patch[2],
        "in_channels": patch[1],
        "out_channels": patch[1],
        "num_layers": layers,
        "attention_head_dim": _HEAD_WIDTH,
        "num_attention_heads": width // _HEAD_WIDTH,
        "joint_attention_dim": _shape(layout, c, "context_embedder.weight")[1],
        "caption_projection_dim": width,
        "pooled_projection_dim": _shape(
            layout, c, "time_text_embed.text_embedder.linear_1.weight")[1],
        "pos_embed_max_size": math.isqrt(tokens),
        "dual_attention_layers": tuple(i for i in range(layers) if layout.names(
            c, f"transformer_blocks.{i}.attn2.")),
        "qk_norm": "rms_norm" if layout.names(c, "transformer_blocks.0.attn.norm_q.") else None,
    }


def t5_config(layout: CheckpointLayout, component: str) -> dict:
    """T5 v1.1 encoder settings (gated GELU feed-forward) for FLUX's and SD3's T5-XXL."""
    c = component
    attention = "encoder.block.0.layer.0.SelfAttention."
    vocab, width = _shape(layout, c, "shared.weight")
    buckets, heads = _shape(layout, c, attention + "relative_attention_bias.weight")
    return {
        "vocab_size": vocab,
        "d_model": width,
        "d_kv": _rows(layout, c, attention + "q.weight") // heads,
        "d_ff": _rows(layout, c, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
        "num_layers": layout.count(c, "encoder.block."),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }
