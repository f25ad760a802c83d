"""Which part of a checkpoint a key belongs to: component prefixes of each single-file layout.

A full checkpoint bundles the diffusion model with text encoders and a VAE under fixed prefixes
(ldm/sgm/comfy conventions); which text encoder sits under a prefix is told by its key names,
so prefixes map to slots here and `text_encoder_identity` names the encoder itself.
"""

from __future__ import annotations

from collections.abc import Iterable

# (prefix, slot): first match wins; order puts longer, more specific prefixes first.
COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "diffusion_model"),
    ("model_ema.", "ema"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("text_encoders.clip_l.", "text_encoder"),
    ("text_encoders.clip_g.", "text_encoder_2"),
    ("text_encoders.t5xxl.", "text_encoder_3"),
    ("vae.", "vae"),
)

# Keys some trainers leave at the top level: noise-schedule buffers and prediction markers.
SCHEDULE_KEYS = frozenset({
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "posterior_variance", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "logvar",
})
PREDICTION_MARKERS = frozenset({"v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min",
                                "edm_mean", "edm_std"})

TEXT_ENCODER_SLOTS = ("text_encoder", "text_encoder_2", "text_encoder_3")

# Recipe-facing groups every architecture has: "text_encoder" applies to every text encoder.
COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "diffusion_model": ("diffusion_model",),
    "unet": ("diffusion_model",),
    "transformer": ("diffusion_model",),
    "text_encoder": TEXT_ENCODER_SLOTS,
    "vae": ("vae",),
    "ema": ("ema",),
    "other": ("other",),
}

# Each architecture's text encoders as recipes name them, which is how diffusers names them:
# (recipe name, slot, model). The slots follow the single-file prefixes, so FLUX's T5
# (`text_encoders.t5xxl.`, as in SD3) sits in slot text_encoder_3, but diffusers, and so our
# users, call it text_encoder_2; the SDXL refiner's one encoder is diffusers' text_encoder_2.
_CLIP_L = ("text_encoder_1", "text_encoder", "CLIP-L")
TEXT_ENCODER_NAMES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (_CLIP_L,),
    "sd2": (("text_encoder_1", "text_encoder", "OpenCLIP-H"),),
    "sdxl": (_CLIP_L, ("text_encoder_2", "text_encoder_2", "CLIP-G")),
    "sdxl-refiner": (("text_encoder_2", "text_encoder", "CLIP-G"),),
    "sd3": (_CLIP_L, ("text_encoder_2", "text_encoder_2", "CLIP-G"),
            ("text_encoder_3", "text_encoder_3", "T5-XXL")),
    "flux": (_CLIP_L, ("text_encoder_2", "text_encoder_3", "T5-XXL")),
}
# Names recipes used before, still read (merged files store their recipes, and extracting one
# must give a recipe that runs): FLUX's T5 was text_encoder_3, the refiner's text_encoder_1.
_FORMER_NAMES = {"flux": {"text_encoder_3": "text_encoder_3"},
                 "sdxl-refiner": {"text_encoder_1": "text_encoder"}}


def text_encoder_names(arch_id: str, family: str) -> tuple[tuple[str, str, str], ...]:
    """An architecture's text encoders: (recipe name, slot, model) each."""
    return TEXT_ENCODER_NAMES.get(arch_id) or TEXT_ENCODER_NAMES.get(family, ())


def recipe_components(arch_id: str, family: str) -> tuple[dict[str, tuple[str, ...]], str]:
    """(component name -> slots, the valid names in words) for recipes of an architecture."""
    own = text_encoder_names(arch_id, family)
    groups = dict(COMPONENT_GROUPS)
    groups.update({name: (slot,) for name, slot, _ in own})
    former = _FORMER_NAMES.get(arch_id) or _FORMER_NAMES.get(family, {})
    groups.update({name: (slot,) for name, slot in former.items()})
    words = ", ".join(["diffusion_model", "unet", "transformer", "text_encoder (all of them)",
                       *(f"{name} ({model})" for name, _, model in own), "vae", "ema", "other"])
    return groups, words


def slot_of(key: str) -> tuple[str, str]:
    """(slot, prefix) of a key in a single-file checkpoint; ("other", "") when no prefix fits."""
    for prefix, slot in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return slot, prefix
    return "other", ""


def slot_in_file(key: str, diffusion_prefix: str) -> tuple[str, str]:
    """`slot_of` for a key of a file whose diffusion model sits under `diffusion_prefix`: a
    UNet or transformer saved alone (prefix "") carries no component prefix, so its unprefixed
    keys, noise-schedule buffers aside, belong to the diffusion model."""
    slot, prefix = slot_of(key)
    if (slot == "other" and diffusion_prefix == "" and key not in SCHEDULE_KEYS
            and key not in PREDICTION_MARKERS):
        return "diffusion_model", ""
    return slot, prefix


def split_by_prefix(keys: Iterable[str]) -> dict[str, tuple[str, list[str]]]:
    """slot -> (prefix, keys relative to the prefix), for keys under a known prefix."""
    slots: dict[str, tuple[str, list[str]]] = {}
    for key in keys:
        slot, prefix = slot_of(key)
        entry = slots.setdefault(slot, (prefix, []))
        entry[1].append(key[len(prefix):])
    return slots


def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children `prefix.N.` the keys have (max N + 1; 0 when none)."""
    top = -1
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                top = max(top, int(head))
    return top + 1


# Width and depth of the text encoders people meet; depth decides when widths were shrunk
# (tiny test models), and some files drop the last layer (SDXL uses the penultimate one).
_CLIP_BY_WIDTH = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "CLIP-G"}
_CLIP_BY_DEPTH = {11: "CLIP-L", 12: "CLIP-L", 23: "OpenCLIP-H", 24: "OpenCLIP-H",
                  31: "CLIP-G", 32: "CLIP-G"}


def text_encoder_identity(relative_keys: set[str], width_of) -> str | None:
    """Name the text encoder whose keys (relative to its prefix) are given, or None.

    `width_of(key)` returns the first dimension of a key's shape.
    """
    for prefix in ("transformer.text_model.", "text_model.", ""):
        q_proj = f"{prefix}encoder.layers.0.self_attn.q_proj.weight"
        if q_proj in relative_keys:
            depth = count_indexed(relative_keys, f"{prefix}encoder.layers.")
            return _CLIP_BY_WIDTH.get(width_of(q_proj)) or _CLIP_BY_DEPTH.get(depth, "CLIP")
    for prefix in ("model.", ""):
        if f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in relative_keys:
            depth = count_indexed(relative_keys, f"{prefix}transformer.resblocks.")
            width = width_of(f"{prefix}transformer.resblocks.0.ln_1.weight")
            return _CLIP_BY_WIDTH.get(width) or _CLIP_BY_DEPTH.get(depth, "OpenCLIP")
    for prefix in ("transformer.", ""):
        q = f"{prefix}encoder.block.0.layer.0.SelfAttention.q.weight"
        if q in relative_keys:
            depth = count_indexed(relative_keys, f"{prefix}encoder.block.")
            return "T5-XXL" if width_of(q) == 4096 or depth == 24 else "T5"
    return None
