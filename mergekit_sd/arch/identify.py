"""Identify a safetensors file from its header alone: kind, architecture, layout, components.

The answer explains itself: `evidence` lists the keys and shapes that decided, `caveats` what the
weights cannot tell (SD2's prediction type, SDXL finetune families).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from mergekit_sd.arch.architectures import ARCHITECTURES
from mergekit_sd.arch.components import (
    PREDICTION_MARKERS,
    SCHEDULE_KEYS,
    TEXT_ENCODER_SLOTS,
    split_by_prefix,
    text_encoder_identity,
)
from mergekit_sd.arch.diffusion import DiffusionModel, detect_diffusion_model
from mergekit_sd.arch.lora import LoraInfo, detect_lora
from mergekit_sd.io.header import SafetensorsHeader

# SDXL finetune families with their own LoRA ecosystems, by the name Civitai gives them
SDXL_FAMILIES = {"pony": "Pony", "illustrious": "Illustrious", "noobai": "NoobAI"}
_METADATA_FOR_HINTS = ("modelspec.title", "modelspec.description", "modelspec.architecture",
                       "ss_base_model_version", "ss_sd_model_name", "ss_output_name")


@dataclass
class Component:
    slot: str  # diffusion_model, text_encoder[_2|_3], vae, ema, schedule, other
    model: str  # what it is: "SDXL base UNet", "CLIP-L", "VAE (4 latent channels)" ...
    prefix: str
    keys: int
    parameters: int
    nbytes: int
    dtypes: dict[str, int]


@dataclass
class Identification:
    kind: str  # checkpoint, diffusion_model, vae, text_encoder, lora, embedding, unknown
    architecture: str | None  # an id of ARCHITECTURES, or the encoder/VAE name for parts
    label: str
    layout: str | None
    variant: str | None = None
    prediction: str | None = None
    components: list[Component] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    lora: LoraInfo | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _summarise(slot: str, model: str, prefix: str, infos) -> Component:
    dtypes = Counter(info.dtype for info in infos)
    return Component(slot, model, prefix, len(infos), sum(math.prod(i.shape) for i in infos),
                     sum(i.nbytes for i in infos), dict(dtypes))


def _vae_model(keys: set[str], shape_of) -> str | None:
    if "decoder.conv_in.weight" not in keys:
        return None
    shape = shape_of("decoder.conv_in.weight")
    return f"VAE ({shape[1]} latent channels)" if shape and len(shape) > 1 else "VAE"


def identify(header: SafetensorsHeader) -> Identification:
    """What the file is, decided from tensor names and shapes (no tensor data is read)."""
    tensors = header.tensors
    shapes = {name: info.shape for name, info in tensors.items()}
    embedding = _identify_embedding(shapes)
    if embedding is not None:
        return embedding
    lora = detect_lora(shapes, header.metadata)
    if lora is not None:
        return _identify_lora(lora)

    slots = split_by_prefix(tensors)
    components: list[Component] = []
    evidence: list[str] = []
    caveats: list[str] = []
    dm: DiffusionModel | None = None
    encoders: dict[str, str] = {}
    vae: str | None = None

    for slot, (prefix, rel_keys) in slots.items():
        keyset = set(rel_keys)

        def shape_of(rel, prefix=prefix):
            return shapes.get(prefix + rel)

        infos = [tensors[prefix + k] for k in rel_keys]
        model = None
        if slot == "diffusion_model":
            dm = detect_diffusion_model(keyset, shape_of, "ldm")
        elif slot in TEXT_ENCODER_SLOTS:
            model = text_encoder_identity(keyset, lambda k, s=shape_of: (s(k) or (None,))[0])
            encoders[slot] = model or "unknown text encoder"
            model = encoders[slot]
        elif slot == "vae":
            model = vae = _vae_model(keyset, shape_of) or "VAE (unrecognised keys)"
        elif slot == "ema":
            model = "EMA copy of the diffusion model"
        elif slot == "other":
            bare_components, bare_dm = _identify_bare(keyset, shape_of, tensors, evidence)
            components.extend(bare_components)
            dm = dm or bare_dm
            continue
        if slot != "diffusion_model":
            components.append(_summarise(slot, model, prefix, infos))
        else:
            components.append(_summarise(slot, "diffusion model", prefix, infos))

    for comp in components:
        if comp.slot in TEXT_ENCODER_SLOTS:
            encoders.setdefault(comp.slot, comp.model)
        if comp.slot == "vae":
            vae = vae or comp.model

    if dm is None:
        return _identify_part(components, encoders, vae, evidence)
    return _identify_model(header, dm, components, encoders, vae, evidence, caveats)


def _identify_bare(keys: set[str], shape_of, tensors, evidence: list[str]
                   ) -> tuple[list[Component], DiffusionModel | None]:
    """Components (and the diffusion model, if any) of keys that carry no single-file prefix:
    one-component files such as a bare UNet/transformer, a VAE or a text encoder."""
    schedule = {k for k in keys if k in SCHEDULE_KEYS or k in PREDICTION_MARKERS}
    rest = keys - schedule
    found: list[Component] = []
    dm = detect_diffusion_model(rest, shape_of, "bare")
    if dm is not None:
        found.append(_summarise("diffusion_model", "diffusion model", "",
                                [tensors[k] for k in rest]))
    elif (vae := _vae_model(rest, shape_of)) is not None:
        layout = "diffusers" if "encoder.down_blocks.0.resnets.0.conv1.weight" in rest else "ldm"
        evidence.append(f"decoder.conv_in.weight reads {shape_of('decoder.conv_in.weight')[1]} "
                        f"latent channels; {layout} VAE key names")
        found.append(_summarise("vae", vae, "", [tensors[k] for k in rest]))
    elif (encoder := text_encoder_identity(rest, lambda k: (shape_of(k) or (None,))[0])):
        found.append(_summarise("text_encoder", encoder, "", [tensors[k] for k in rest]))
    elif rest:
        found.append(_summarise("other", "unrecognised keys", "", [tensors[k] for k in rest]))
    if schedule:
        found.append(_summarise("schedule", "noise schedule / prediction markers", "",
                                [tensors[k] for k in schedule]))
    return found, dm


# textual inversion embeddings: vectors as wide as the text encoder's tokens
_EMBEDDING_WIDTHS = {768: ("sd1", "SD1.x"), 1024: ("sd2", "SD2.x")}


def _identify_embedding(shapes: dict[str, tuple[int, ...]]) -> Identification | None:
    """A textual inversion embedding: `emb_params` (SD1/SD2) or `clip_l` + `clip_g` (SDXL)."""
    if set(shapes) == {"clip_l", "clip_g"} and len(shapes["clip_g"]) == 2:
        vectors = shapes["clip_g"][0]
        return Identification("embedding", "sdxl", f"textual inversion for SDXL ({vectors} "
                              "vectors)", None, evidence=["clip_l and clip_g vectors: SDXL"])
    shape = shapes.get("emb_params") if len(shapes) == 1 else None
    if shape and len(shape) == 2 and shape[1] in _EMBEDDING_WIDTHS:
        arch, label = _EMBEDDING_WIDTHS[shape[1]]
        return Identification("embedding", arch, f"textual inversion for {label} ({shape[0]} "
                              "vectors)", None, evidence=[f"emb_params {shape[1]} wide: {label}"])
    return None


def _identify_lora(lora: LoraInfo) -> Identification:
    arch = ARCHITECTURES.get(lora.base or "")
    label = f"{lora.format} for {arch.label if arch else 'an unknown base'}"
    return Identification("lora", lora.base, label, None, evidence=list(lora.evidence),
                          caveats=list(lora.caveats), lora=lora)


def _identify_part(components, encoders, vae, evidence) -> Identification:
    if vae and not encoders:
        latent = vae.split("(")[1].split()[0] if "(" in vae else "?"
        fits = {"4": "SD1.x, SD2.x and SDXL", "16": "SD3 and FLUX.1"}.get(latent, "unknown models")
        caveats = ["SD1 and SDXL VAEs share their shapes; which one this is cannot be told from "
                   "the names"] if latent == "4" else []
        return Identification("vae", vae, f"{vae}, fits {fits}", _layout_of(evidence), None,
                              None, components, evidence, caveats)
    if encoders and not vae:
        names = " + ".join(dict.fromkeys(encoders.values()))
        return Identification("text_encoder", names, f"{names} text encoder", "transformers",
                              components=components, evidence=evidence)
    return Identification("unknown", None, "unrecognised tensor collection", None,
                          components=components, evidence=evidence,
                          caveats=["no known diffusion model, VAE, text encoder or LoRA keys"])


def _layout_of(evidence: list[str]) -> str | None:
    return "diffusers" if any("diffusers" in e for e in evidence) else "ldm"


def _identify_model(header, dm: DiffusionModel, components, encoders, vae, evidence, caveats
                    ) -> Identification:
    evidence.extend(dm.evidence)
    arch_id = dm.architecture
    clips = set(encoders.values())
    if not dm.settled:
        if "OpenCLIP-H" in clips:
            arch_id = "sd2"
            evidence.append("bundled text encoder is OpenCLIP-H: SD2.x")
        elif "CLIP-L" in clips:
            evidence.append("bundled text encoder is CLIP-L: SD1.x")
        else:
            caveats.append("SD1 and SD2 could not be told apart (no known text width); "
                           "assumed SD1")
    architecture = ARCHITECTURES[arch_id]
    for comp in components:
        if comp.slot == "diffusion_model":
            network = "UNet" if architecture.family in ("sd", "sdxl") else "transformer"
            comp.model = f"{architecture.label} {network}"
    caveats.extend(architecture.caveats)
    prediction = _prediction(header, dm, arch_id)
    if architecture.family == "sdxl":
        hint = _family_hint(header.metadata)
        if hint:
            evidence.append(hint)
    has_parts = bool(encoders) or vae is not None
    kind = "checkpoint" if has_parts else "diffusion_model"
    layout = dm.layout
    if dm.layout == "bare":
        layout = {"sd": "ldm", "sdxl": "sgm", "flux": "bfl", "sd3": "mmdit"}[architecture.family]
    label = architecture.label
    if dm.variant and dm.variant.lower() not in label.lower().split():
        label += f" {dm.variant}"  # not where the architecture is the variant (FLUX.1 Fill)
    if kind == "diffusion_model":
        label += " (diffusion model only)"
    elif encoders:
        label += f" with {' + '.join(dict.fromkeys(encoders.values()))}"
        if vae:
            label += " and VAE"
    return Identification(kind, arch_id, label, layout, dm.variant, prediction, components,
                          evidence, caveats)


def _prediction(header, dm: DiffusionModel, arch_id: str) -> str | None:
    tensors = header.tensors
    said = header.metadata.get("modelspec.prediction_type")
    if said:
        return f"{said} (modelspec.prediction_type)"
    if "v_pred" in tensors or "edm_vpred.sigma_max" in tensors:
        marker = "v_pred" if "v_pred" in tensors else "edm_vpred.*"
        ztsnr = ", zero terminal SNR" if "ztsnr" in tensors else ""
        return f"v-prediction{ztsnr} (the file has {marker} marker keys)"
    if dm.prediction:
        return dm.prediction
    if arch_id == "sd2":
        return "unknown: v (768-v) or epsilon (512-base)"
    return "epsilon (no v-prediction marker keys)"


def sdxl_family(metadata: dict[str, str]) -> str | None:
    """Pony, Illustrious or NoobAI when the file's title, description or training base says so;
    the weights alone cannot tell these SDXL finetunes apart."""
    text = " ".join(metadata.get(k, "") for k in _METADATA_FOR_HINTS).lower()
    for hint, family in SDXL_FAMILIES.items():
        if hint in text:
            return family
    return None


def _family_hint(metadata: dict[str, str]) -> str | None:
    family = sdxl_family(metadata)
    return f"metadata mentions {family} (a hint, not a structural fact)" if family else None
