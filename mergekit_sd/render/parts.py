"""Text encoders and VAEs given as separate files (`--text-encoder`, `--vae`).

The SD3.5 releases ship the MMDiT and VAE without text encoders, BFL's FLUX.1 files the
transformer alone, and ComfyUI users keep clip_l / clip_g / t5xxl and ae.safetensors as files of
their own. Such a file is recognised by its tensor layout (`arch.identify`), in the key formats
these files are published in: transformers' own names (`text_model.encoder.layers.N...`,
`encoder.block.N...`), an ldm VAE with bare keys (ae.safetensors, sdxl_vae.safetensors) or
diffusers' names, and the single-file prefixed forms (`text_encoders.clip_g.transformer.`,
`first_stage_model.` ...), whose conversion the key maps (diffusers' converters) already do.
Each file then fills, for every candidate of a fitting architecture that lacks it, its
component of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mergekit_sd.arch.components import TEXT_ENCODER_SLOTS
from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.arch.keymap import ComponentMap, Segment, Source, diffusers_key_maps
from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.header import read_header
from mergekit_sd.recipe.refs import Resolver
from mergekit_sd.render.layout import FAMILY_LABELS, CheckpointLayout
from mergekit_sd.render.refs import resolve_file

TEXT_ENCODER_OPTION = "--text-encoder"
VAE_OPTION = "--vae"

# the pipeline component each text encoder fills, per family (FLUX calls its T5 the second)
_ENCODER_COMPONENTS = {
    "CLIP-L": {"sd1": "text_encoder", "sdxl": "text_encoder", "sd3": "text_encoder",
               "flux": "text_encoder"},
    "CLIP-G": {"sdxl": "text_encoder_2", "sd3": "text_encoder_2"},
    "T5-XXL": {"sd3": "text_encoder_3", "flux": "text_encoder_2"},
}
# latent channels of a VAE -> the families that decode with it
_VAE_FAMILIES = {4: ("sd1", "sdxl"), 16: ("sd3", "flux")}
# the key maps' prefix under which bare ldm VAE keys are converted
_LDM_VAE = "first_stage_model."


@dataclass(frozen=True)
class Part:
    """One component from a separate file."""

    option: str  # --text-encoder or --vae
    ref: str  # as the user gave it
    path: Path
    known_sha256: str | None
    model: str  # CLIP-L, CLIP-G, T5-XXL, or the VAE's latent channel count as "VAE (16 ...)"
    families: tuple[str, ...]  # the families it fits
    source: ComponentMap  # diffusers parameter name -> where it lives in the file
    key_shapes: dict[str, tuple[int, ...]]
    found: Identification

    @property
    def label(self) -> str:
        """How the manifest names it among the candidates."""
        return self.path.name

    def component(self, family: str) -> str:
        return "vae" if self.option == VAE_OPTION else _ENCODER_COMPONENTS[self.model][family]

    def layout(self, family: str) -> CheckpointLayout:
        """The file as a layout holding this one component: what the pipeline loads."""
        return CheckpointLayout(self.path.name, self.found, family,
                                {self.component(family): self.source}, self.key_shapes)


def _identity(shapes: dict[str, tuple[int, ...]], name=lambda key: key) -> ComponentMap:
    """Keys already in the naming the pipeline's modules use (transformers', diffusers'),
    up to `name`."""
    return {name(key): Source((Segment(key, 0, shape[0] if shape else 1),))
            for key, shape in shapes.items()}


def _clip_name(key: str) -> str:
    """CLIP files are published with `text_model.` names (transformers 4's state dict), but
    transformers 5 saves a CLIPTextModel without it, and some files carry `transformer.`."""
    key = key.removeprefix("transformer.")
    return "text_model." + key if key.startswith(("embeddings.", "encoder.",
                                                    "final_layer_norm.")) else key


def _under(prefix: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, ComponentMap]:
    """The key maps of bare keys read as if they had `prefix`, the prefix then taken off."""
    maps = diffusers_key_maps({prefix + k: v for k, v in shapes.items()})
    return {component: {name: replace(source, segments=tuple(
        replace(seg, key=seg.key.removeprefix(prefix)) for seg in source.segments))
        for name, source in mapping.items()} for component, mapping in maps.items()}


def _read(option: str, ref: str, resolver: Resolver | None) -> tuple:
    found = resolve_file(ref, resolver, option)
    try:
        header = read_header(found.path)
    except BadModelFile as exc:
        raise UserError(f"{option} {exc}") from None
    shapes = {key: info.shape for key, info in header.tensors.items()}
    return Path(found.path), found.sha256, identify(header), shapes


def _text_encoders(ref: str, resolver: Resolver | None) -> list[Part]:
    path, sha256, found, shapes = _read(TEXT_ENCODER_OPTION, ref, resolver)
    wanted = ", ".join(_ENCODER_COMPONENTS)
    if found.kind != "text_encoder":
        raise UserError(f"{TEXT_ENCODER_OPTION} {ref}: is {found.label}, not a text encoder; "
                        f"give {wanted} files (ComfyUI's models/text_encoders/ holds them)")
    maps = diffusers_key_maps(shapes)  # prefixed single-file forms
    parts = []
    for comp in found.components:
        if comp.slot not in TEXT_ENCODER_SLOTS:
            continue
        if comp.model not in _ENCODER_COMPONENTS:
            raise UserError(f"{TEXT_ENCODER_OPTION} {ref}: is {_article(comp.model)} "
                            f"{comp.model} text encoder; rendering takes {wanted}")
        if comp.prefix:
            source = maps.get(comp.slot)
        else:  # bare keys in transformers' names: what the pipeline's encoders use
            source = _identity(shapes, _clip_name if comp.model.startswith("CLIP") else str)
        if not source:
            raise UserError(f"{TEXT_ENCODER_OPTION} {ref}: its {comp.model} keys are in no "
                            "layout the key maps know; give it in transformers' names")
        parts.append(Part(TEXT_ENCODER_OPTION, ref, path, sha256, comp.model,
                          tuple(_ENCODER_COMPONENTS[comp.model]), source, shapes, found))
    return parts


def _vae(ref: str, resolver: Resolver | None) -> Part:
    path, sha256, found, shapes = _read(VAE_OPTION, ref, resolver)
    if found.kind != "vae":
        raise UserError(f"{VAE_OPTION} {ref}: is {found.label}, not a VAE; give a VAE file "
                        "(e.g. ae.safetensors for FLUX.1, sdxl_vae.safetensors)")
    prefix = found.components[0].prefix
    conv_in = shapes[prefix + "decoder.conv_in.weight"]
    families = _VAE_FAMILIES.get(conv_in[1] if len(conv_in) > 1 else 0)
    if families is None:
        raise UserError(f"{VAE_OPTION} {ref}: is {found.label}; rendering takes VAEs of 4 "
                        "(SD1.x, SDXL) or 16 (SD3.x, FLUX.1) latent channels")
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:  # diffusers' own names
        source = _identity(shapes)
    else:
        maps = diffusers_key_maps(shapes) if prefix else _under(_LDM_VAE, shapes)
        source = maps.get("vae")
    if not source:
        raise UserError(f"{VAE_OPTION} {ref}: its keys are in no VAE layout the key maps "
                        "know (ldm or diffusers)")
    return Part(VAE_OPTION, ref, path, sha256, found.components[0].model, families, source,
                shapes, found)


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


def read_parts(text_encoders: list[str], vae: str | None,
               resolver: Resolver | None = None) -> list[Part]:
    """The components the files given with --text-encoder and --vae hold; one sentence for a
    file that is none of them, or two files of the same kind."""
    parts = [p for ref in text_encoders for p in _text_encoders(ref, resolver)]
    if vae is not None:
        parts.append(_vae(vae, resolver))
    seen: dict[str, Part] = {}
    for part in parts:
        if part.model in seen and seen[part.model].path != part.path:
            raise UserError(f"{part.option} {seen[part.model].ref} and {part.ref} are both "
                            f"{part.model}; give one")
        seen[part.model] = part
    return list(seen.values())


def parts_for(family: str, parts: list[Part]) -> dict[str, Part]:
    """component -> the file that supplies it, for the candidates of `family`."""
    return {part.component(family): part for part in parts if family in part.families}


def check_used(parts: list[Part], families: dict[str, list]) -> list[str]:
    """Refuse a file no architecture of the run takes; a note (returned) for one that every
    candidate of its architecture has its own copy of."""
    notes = []
    for part in parts:
        fitting = [f for f in families if f in part.families]
        if not fitting:
            labels = ", ".join(FAMILY_LABELS[f] for f in families)
            raise UserError(f"{part.option} {part.ref}: is {part.found.label}, which the "
                            f"candidates ({labels}) do not use")
        if all(part.component(f) in c.layout.maps for f in fitting for c in families[f]):
            labels = " and ".join(FAMILY_LABELS[f] for f in fitting)
            notes.append(f"{part.option} {part.ref} was not used: every {labels} candidate "
                         f"has its own {part.component(fitting[0])}")
    return notes


def with_parts(layout: CheckpointLayout, parts: dict[str, Part]) -> CheckpointLayout:
    """`layout` completed with the components it lacks from `parts`: what the pipeline's
    models and tokenizers are derived from. Each file's keys get its own namespace, since
    CLIP-L and CLIP-G files share key names."""
    maps, shapes = dict(layout.maps), dict(layout.key_shapes)
    for component, part in parts.items():
        if component in maps:
            continue
        tag = f"{component}:"
        maps[component] = {name: replace(source, segments=tuple(
            replace(seg, key=tag + seg.key) for seg in source.segments))
            for name, source in part.source.items()}
        shapes.update({tag + key: shape for key, shape in part.key_shapes.items()})
    return replace(layout, maps=maps, key_shapes=shapes)
