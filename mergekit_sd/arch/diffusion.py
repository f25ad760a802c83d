"""Tell which diffusion model a set of keys is (UNet or transformer), from names and shapes only.

Each `_detect_*` function looks for its family's signature keys and returns None when they are
absent, so adding a family is adding one function to DETECTORS. Evidence sentences name the keys
and shapes that decided, so a user can check the answer against the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mergekit_sd.arch.components import count_indexed

ShapeOf = Callable[[str], tuple[int, ...] | None]


@dataclass
class DiffusionModel:
    architecture: str  # an id of architectures.ARCHITECTURES
    layout: str  # ldm, sgm, comfy, bfl, diffusers
    variant: str | None = None  # inpainting, instruct-pix2pix, depth/canny
    prediction: str | None = None
    evidence: list[str] = field(default_factory=list)
    # False when the weights' shapes could not decide between SD1 and SD2 (shrunk test models);
    # the caller then asks the bundled text encoder.
    settled: bool = True


_SD_CONV_IN_VARIANTS = {9: "inpainting", 8: "instruct-pix2pix"}
# an SD UNet's conv_in in ldm/sgm and in diffusers naming: its input channels say the variant
SD_CONV_IN_KEYS = ("input_blocks.0.0.weight", "conv_in.weight")


def sd_conv_in_variant(shape: tuple[int, ...]) -> str | None:
    """"inpainting" or "instruct-pix2pix" from the shape of an SD UNet's conv_in weight (9 or
    8 input channels), None for a plain model's 4."""
    return _SD_CONV_IN_VARIANTS.get(shape[1]) if len(shape) > 1 else None


# cross-attention context width -> architecture, for UNets without SDXL's label embedding
_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2"}
# SDXL label embedding input width: base adds pooled CLIP-G + 6 size/crop embeddings, refiner 5
_SDXL_ADM = {2816: "sdxl", 2560: "sdxl-refiner"}
_FLUX_IMG_IN = {64: None, 384: "fill", 128: "depth/canny"}


def _detect_ldm_unet(keys: set[str], shape_of: ShapeOf, layout: str) -> DiffusionModel | None:
    if "input_blocks.0.0.weight" not in keys or "time_embed.0.weight" not in keys:
        return None
    conv_in = shape_of("input_blocks.0.0.weight")
    evidence = []
    variant = _SD_CONV_IN_VARIANTS.get(conv_in[1]) if conv_in and len(conv_in) > 1 else None
    if variant:
        evidence.append(f"input_blocks.0.0.weight takes {conv_in[1]} channels: {variant}")
    if "label_emb.0.0.weight" in keys:
        adm = shape_of("label_emb.0.0.weight")[1]
        arch = _SDXL_ADM.get(adm)
        if arch is None:  # shrunk test model or unusual finetune: depth decides
            arch = "sdxl" if count_indexed(keys, "input_blocks.") == 9 else "sdxl-refiner"
            evidence.append(f"label_emb (ADM) present with {count_indexed(keys, 'input_blocks.')}"
                            f" input blocks: {arch}")
        else:
            evidence.append(f"label_emb.0.0.weight takes {adm} features: {arch}")
        return DiffusionModel(arch, "sgm" if layout == "ldm" else layout, variant,
                              evidence=evidence)
    arch = None
    for key in sorted(k for k in keys if k.endswith("attn2.to_k.weight")):
        width = shape_of(key)[1]
        arch = _CONTEXT_WIDTH.get(width)
        if arch:
            evidence.append(f"cross-attention {key} reads {width}-wide text features: {arch}")
        break
    return DiffusionModel(arch or "sd1", layout, variant, evidence=evidence, settled=bool(arch))


def _detect_mmdit(keys: set[str], shape_of: ShapeOf, layout: str) -> DiffusionModel | None:
    if "joint_blocks.0.x_block.attn.qkv.weight" not in keys:
        return None
    depth = count_indexed(keys, "joint_blocks.")
    has_attn2 = "joint_blocks.0.x_block.attn2.qkv.weight" in keys
    if has_attn2:
        arch, why = "sd3.5-medium", "joint blocks have a second x_block attention (MMDiT-X)"
    elif depth >= 38:
        arch, why = "sd3.5-large", f"{depth} joint blocks"
    else:
        arch, why = "sd3-medium", f"{depth} joint blocks without MMDiT-X attention"
    return DiffusionModel(arch, "comfy" if layout == "ldm" else "mmdit", None,
                          "flow matching (rectified flow)", [f"{why}: {arch}"])


def _detect_bfl_flux(keys: set[str], shape_of: ShapeOf, layout: str) -> DiffusionModel | None:
    if "double_blocks.0.img_attn.qkv.weight" not in keys:
        return None
    evidence = [f"{count_indexed(keys, 'double_blocks.')} double and "
                f"{count_indexed(keys, 'single_blocks.')} single blocks: FLUX.1"]
    img_in = shape_of("img_in.weight")
    variant = _FLUX_IMG_IN.get(img_in[1]) if img_in else None
    if variant == "fill":
        arch = "flux-fill"
        evidence.append("img_in.weight takes 384 features (image + mask latents): Fill")
    elif "guidance_in.in_layer.weight" in keys:
        arch = "flux-dev"
        evidence.append("guidance_in present (guidance-distilled): dev")
    else:
        arch = "flux-schnell"
        evidence.append("no guidance_in (timestep-distilled): schnell")
    if variant == "depth/canny":
        evidence.append("img_in.weight takes 128 features: a Depth/Canny control model")
    return DiffusionModel(arch, "comfy" if layout == "ldm" else "bfl", variant,
                          "flow matching (rectified flow)", evidence)


def _detect_diffusers(keys: set[str], shape_of: ShapeOf, layout: str) -> DiffusionModel | None:
    if "time_embedding.linear_1.weight" in keys and "conv_in.weight" in keys:
        variant = _SD_CONV_IN_VARIANTS.get((shape_of("conv_in.weight") or (0, 0))[1])
        if "add_embedding.linear_1.weight" in keys:
            adm = shape_of("add_embedding.linear_1.weight")[1]
            arch = _SDXL_ADM.get(adm, "sdxl")
            why = f"add_embedding takes {adm} features: {arch}"
        else:
            key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
            width = (shape_of(key) or (0, 0))[1]
            arch = _CONTEXT_WIDTH.get(width)
            why = f"cross-attention reads {width}-wide text features: {arch or 'SD1 or SD2'}"
        return DiffusionModel(arch or "sd1", "diffusers", variant,
                              evidence=[f"diffusers UNet; {why}"], settled=bool(arch))
    if "x_embedder.weight" in keys and "single_transformer_blocks.0.proj_out.weight" in keys:
        guided = "time_text_embed.guidance_embedder.linear_1.weight" in keys
        arch = "flux-dev" if guided else "flux-schnell"
        return DiffusionModel(arch, "diffusers", None, "flow matching (rectified flow)",
                              [f"diffusers FLUX transformer, guidance embedder "
                               f"{'present' if guided else 'absent'}: {arch}"])
    if "pos_embed.proj.weight" in keys and "transformer_blocks.0.attn.add_q_proj.weight" in keys:
        depth = count_indexed(keys, "transformer_blocks.")
        arch = ("sd3.5-medium" if "transformer_blocks.0.attn2.to_q.weight" in keys
                else "sd3.5-large" if depth >= 38 else "sd3-medium")
        return DiffusionModel(arch, "diffusers", None, "flow matching (rectified flow)",
                              [f"diffusers SD3 transformer with {depth} blocks: {arch}"])
    return None


DETECTORS = (_detect_ldm_unet, _detect_mmdit, _detect_bfl_flux, _detect_diffusers)


def detect_diffusion_model(keys: set[str], shape_of: ShapeOf, layout: str
                           ) -> DiffusionModel | None:
    """The diffusion model the keys (relative to their prefix) form, or None if none does."""
    for detector in DETECTORS:
        found = detector(keys, shape_of, layout)
        if found is not None:
            return found
    return None
