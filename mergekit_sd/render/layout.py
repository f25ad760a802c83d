"""A checkpoint as a diffusers pipeline sees it: which pipeline family, and where every diffusers
parameter of every component lives in the file (from `mergekit_sd.arch.keymap`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mergekit_sd.arch.identify import Identification, identify
from mergekit_sd.arch.keymap import ComponentMap, diffusers_key_maps
from mergekit_sd.errors import UserError
from mergekit_sd.io.header import SafetensorsHeader

# architecture id (mergekit_sd.arch.architectures) -> the pipeline family that renders it
FAMILIES = {
    "sd1": "sd1",
    "sdxl": "sdxl",
    "sd3-medium": "sd3",
    "sd3.5-medium": "sd3",
    "sd3.5-large": "sd3",
    "flux-dev": "flux",
    "flux-schnell": "flux",
}
FAMILY_LABELS = {"sd1": "SD1.x", "sdxl": "SDXL", "sd3": "SD3.x", "flux": "FLUX.1"}
# The key maps number text encoders as SD3 does (T5 third); FLUX's pipeline calls T5 its second.
_PIPELINE_NAMES = {"flux": {"text_encoder_3": "text_encoder_2"}}
# The diffusion model's component name in the pipeline, per family.
DIFFUSION_COMPONENT = {"sd1": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


@dataclass(frozen=True)
class CheckpointLayout:
    name: str  # the file's name, for messages
    found: Identification
    family: str
    maps: dict[str, ComponentMap]  # component -> diffusers parameter name -> source
    key_shapes: dict[str, tuple[int, ...]]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.maps)

    @property
    def is_full(self) -> bool:
        """Whether the file holds everything a pipeline needs (not a UNet or transformer alone);
        FLUX and SD3 release files often leave text encoders out, so those count as partial."""
        return self.found.kind == "checkpoint" and all(
            c in self.maps for c in required_components(self.family))

    def shape(self, component: str, name: str) -> tuple[int, ...] | None:
        """The diffusers tensor's shape as (rows, the key's other dims); None when absent.

        Exact for everything configs are derived from (weights keep their key's layout there);
        a converter's reshape (VAE attention 1x1 convs to linear) is not reflected."""
        source = self.maps.get(component, {}).get(name)
        if source is None:
            return None
        first = self.key_shapes[source.segments[0].key]
        rows = sum(seg.stop - seg.start for seg in source.segments)
        shape = (rows, *first[1:])
        return tuple(reversed(shape)) if source.transposed else shape

    def names(self, component: str, prefix: str = "") -> list[str]:
        return [n for n in self.maps.get(component, {}) if n.startswith(prefix)]

    def count(self, component: str, prefix: str) -> int:
        """How many numbered children `prefix` has (`down_blocks.0.resnets.` -> 2)."""
        numbers = set()
        for name in self.names(component, prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                numbers.add(int(head))
        return len(numbers)


_LDM_UNET = "model.diffusion_model."


def _bare_unet_maps(shapes: dict[str, tuple[int, ...]]) -> dict[str, ComponentMap] | None:
    """The key maps know UNets under `model.diffusion_model.` only; a UNet saved alone (bare
    `input_blocks.*` keys) is mapped as if it had that prefix, then the prefix is dropped."""
    if "input_blocks.0.0.weight" not in shapes:
        return None
    maps = diffusers_key_maps({_LDM_UNET + k: v for k, v in shapes.items()})
    unet = maps.get("unet")
    if unet is None:
        return None
    return {"unet": {name: replace(source, segments=tuple(
        replace(seg, key=seg.key.removeprefix(_LDM_UNET)) for seg in source.segments))
        for name, source in unet.items()}}


def required_components(family: str) -> tuple[str, ...]:
    return {"sd1": ("unet", "text_encoder", "vae"),
            "sdxl": ("unet", "text_encoder", "text_encoder_2", "vae"),
            "sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"),
            "flux": ("transformer", "text_encoder", "text_encoder_2", "vae")}[family]


def checkpoint_layout(header: SafetensorsHeader) -> CheckpointLayout:
    """The layout of a checkpoint or diffusion model file, or one sentence saying why it cannot
    be rendered."""
    shapes = {key: info.shape for key, info in header.tensors.items()}
    return layout_of(Path(header.path).name, identify(header), shapes)


def layout_of(name: str, found: Identification, shapes: dict[str, tuple[int, ...]]
              ) -> CheckpointLayout:
    """The layout of tensors with these `shapes`, identified as `found` (a file's header, or a
    merge's output computed in memory)."""
    if found.kind not in ("checkpoint", "diffusion_model"):
        raise UserError(f"{name} is {found.label}, not a checkpoint; render checkpoints "
                        "(a LoRA goes to --lora)")
    family = FAMILIES.get(found.architecture or "")
    if family is None or found.variant:
        supported = ", ".join(sorted({FAMILY_LABELS[f] for f in FAMILIES.values()}))
        raise UserError(f"{name} is {found.label}; rendering supports {supported} "
                        "text-to-image checkpoints")
    maps = diffusers_key_maps(shapes)
    if DIFFUSION_COMPONENT[family] not in maps:
        maps = _bare_unet_maps(shapes) or maps
    if DIFFUSION_COMPONENT[family] not in maps:
        raise UserError(f"{name}: its diffusion model keys are not in a layout the key maps "
                        "know (ldm, sgm, ComfyUI or BFL); convert it to one of those")
    renames = _PIPELINE_NAMES.get(family, {})
    maps = {renames.get(component, component): m for component, m in maps.items()}
    return CheckpointLayout(name, found, family, maps, dict(shapes))
