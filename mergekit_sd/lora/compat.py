"""Whether a LoRA, or a second checkpoint, belongs to the same model as a checkpoint.

Families (sd, sdxl, flux, sd3) share key names, so the family alone lets an SD2 LoRA into
SD1 (its modules that happen to fit bake, the rest are listed). Within the SD family the
identification tells SD1 from SD2 by the text features' width or the text encoder's depth; only
where it had to assume SD1 (a UNet-only LoRA of 3x3 convs, say) is the family all we know.
"""

from __future__ import annotations

from mergekit_sd.arch.architectures import ARCHITECTURES, Architecture
from mergekit_sd.arch.identify import Identification

_ASSUMED = "assumed SD1"  # the caveat of a LoRA whose SD1/SD2 could not be told
# families whose members are different networks (not one network's variants, as FLUX dev,
# schnell and fill are, or the SD3 sizes, which the shapes already tell apart)
_STRICT_FAMILIES = ("sd", "sdxl")


def lora_architecture(found: Identification) -> Architecture | None:
    base = found.lora.base if found.lora else None
    return ARCHITECTURES.get(base) if base else None


def lora_fits(found: Identification, arch: Architecture) -> bool:
    """Whether the LoRA `found` is for `arch` as far as its identification can tell."""
    lora_arch = lora_architecture(found)
    if lora_arch is None:
        return True  # nothing known: its modules decide
    if lora_arch.family != arch.family:
        return False
    return is_guess(found) or arch.family != "sd" or lora_arch.id == arch.id


def is_guess(found: Identification) -> bool:
    """Whether the LoRA's SD1 is an assumption (it could as well be SD2)."""
    return bool(found.lora) and any(_ASSUMED in c for c in found.lora.caveats)


def same_network(a: Architecture, b: Architecture) -> bool:
    """Two checkpoints' architectures: one network (SD1 and SD2 are not; FLUX dev and schnell
    are)."""
    if a.family != b.family:
        return False
    return a.family not in _STRICT_FAMILIES or a.id == b.id


def not_what_is_wanted(found: Identification, header, wanted: str) -> str:
    """"is a kohya LoRA for SD1.x, not WANTED", "holds no tensors, so it is not WANTED": why a
    file is refused in the wrong place."""
    if not header.tensors:
        return f"holds no tensors, so it is not {wanted}"
    label = found.label
    if label[:1].islower():  # "unrecognised tensor collection", "kohya LoRA for ..."
        label = f"{'an' if label[0] in 'aeiou' else 'a'} {label}"
    return f"is {label}, not {wanted}"
