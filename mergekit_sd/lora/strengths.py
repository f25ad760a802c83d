"""Per-block strengths of a LoRA (LoRA Block Weight style): lists, named presets, block maps.

A block strength multiplies the LoRA's strength on every weight of that block. Forms:

  list / "1,0,0.5,..."  positional over the architecture's blocks: all of them (SD 26, SDXL 20,
                        FLUX 57, SD3 25/39 values, in `mergekit-sd blocks ARCH` order), or
                        LoRA Block Weight's short forms: 17 values for SD1/SD2 (BASE IN01 IN02
                        IN04 IN05 IN07 IN08 M00 OUT03-OUT11) and 12 for SDXL (BASE IN04 IN05 IN07
                        IN08 M00 OUT00-OUT05). Blocks a short form leaves out keep strength 1.
                        As in LoRA Block Weight, the BASE value also scales the text encoders.
  "all" "none" "in" "mid" "out" "in-mid" "mid-out" "double" "single"
                        named presets: 1 on those blocks (and BASE), 0 elsewhere.
  {"IN*": 0.5, "OUT05": 1.2, "default": 1}
                        block names or shell patterns; the first matching entry wins.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from mergekit_sd.arch.architectures import Architecture
from mergekit_sd.errors import UserError

_SHORT_FORMS = {
    "sd": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
           *(f"OUT{i:02d}" for i in range(3, 12))),
    "sdxl": ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
}
PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("*",), "none": (), "in": ("BASE", "IN*"), "mid": ("BASE", "M*"),
    "out": ("BASE", "OUT*"), "in-mid": ("BASE", "IN*", "M*"), "mid-out": ("BASE", "M*", "OUT*"),
    "double": ("BASE", "D*"), "single": ("BASE", "S*"),
}

BlockSpec = None | str | list[float] | Mapping[str, float]


class BadBlockStrengths(UserError):
    pass


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        return None


def _positional(values: list[float], arch: Architecture, where: str) -> dict[str, float]:
    if len(values) == len(arch.blocks):
        return dict(zip(arch.blocks, values, strict=True))
    short = _SHORT_FORMS.get(arch.family)
    if short and len(values) == len(short):
        strengths = dict.fromkeys(arch.blocks, 1.0)
        strengths.update(zip(short, values, strict=True))
        return strengths
    sizes = f"{len(arch.blocks)}" + (f" or {len(short)}" if short else "")
    raise BadBlockStrengths(f"{where}: {len(values)} block strengths given; {arch.label} takes "
                            f"{sizes} (see `mergekit-sd blocks {arch.id}`)")


def block_strengths(spec: BlockSpec, arch: Architecture, where: str = "blocks"
                    ) -> dict[str, float]:
    """Block name -> strength multiplier for every block of `arch`, plus "TE" for the text
    encoders (BASE's value, as LoRA Block Weight does)."""
    if spec is None or spec == "":
        strengths = dict.fromkeys(arch.blocks, 1.0)
    elif isinstance(spec, str):
        numbers = _numbers(spec)
        if numbers is not None:
            strengths = _positional(numbers, arch, where)
        elif spec.lower() in PRESETS:
            patterns = PRESETS[spec.lower()]
            strengths = {b: float(any(fnmatch.fnmatchcase(b, p) for p in patterns))
                         for b in arch.blocks}
        else:
            raise BadBlockStrengths(f"{where}: {spec!r} is neither a preset ({', '.join(PRESETS)})"
                                    " nor a comma-separated list of numbers")
    elif isinstance(spec, list):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
            raise BadBlockStrengths(f"{where}: a block list holds numbers only")
        strengths = _positional([float(v) for v in spec], arch, where)
    elif isinstance(spec, Mapping):
        strengths = _from_patterns(spec, arch, where)
    else:
        raise BadBlockStrengths(f"{where}: give a preset name, a list of numbers or a map of "
                                "block names to numbers")
    strengths["TE"] = strengths.get("BASE", 1.0)
    return strengths


def _from_patterns(spec: Mapping[str, float], arch: Architecture, where: str) -> dict[str, float]:
    default = float(spec.get("default", 1.0))
    patterns = [(str(p), float(v)) for p, v in spec.items() if p != "default"]
    for pattern, _ in patterns:
        if not any(fnmatch.fnmatchcase(b, pattern) for b in arch.blocks):
            raise BadBlockStrengths(f"{where}: {pattern!r} matches no block of {arch.label} "
                                    f"(see `mergekit-sd blocks {arch.id}`)")
    return {b: next((v for p, v in patterns if fnmatch.fnmatchcase(b, p)), default)
            for b in arch.blocks}
