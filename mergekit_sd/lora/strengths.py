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
import math
import re
from collections.abc import Mapping

from mergekit_sd.arch.architectures import Architecture, block_range
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


# a number as people write one: Python's float() also takes nan, inf and 1_0 (= 10)
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def plain_number(text: str) -> float | None:
    """`text` as a finite number written plainly, or None when it is not one."""
    if not _PLAIN_NUMBER.fullmatch(text.strip()):
        return None
    value = float(text)
    return value if math.isfinite(value) else None  # 1e999 is inf


def is_nonfinite(value) -> bool:
    return isinstance(value, int | float) and not math.isfinite(value)


def _numbers(text: str, where: str) -> list[float] | None:
    """The comma-separated numbers of `text`; None when it holds no number at all (a preset),
    an error when some are numbers and some not (nan, inf, a typo)."""
    parts = text.split(",")
    values = [plain_number(part) for part in parts]
    if all(v is None for v in values) and len(parts) == 1:
        return None
    bad = next((p for p, v in zip(parts, values, strict=True) if v is None), None)
    if bad is not None:
        raise BadBlockStrengths(f"{where}: {bad.strip()!r} in {text!r} is not a finite number; "
                                "give comma-separated numbers such as 1,0,0.5")
    return values


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
        numbers = _numbers(spec, where)
        if numbers is not None:
            strengths = _positional(numbers, arch, where)
        elif spec.lower() in PRESETS:
            strengths = _preset(spec.lower(), arch, where)
        else:
            raise BadBlockStrengths(f"{where}: {spec!r} is neither a preset ({', '.join(PRESETS)})"
                                    " nor a comma-separated list of numbers")
    elif isinstance(spec, list):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
            raise BadBlockStrengths(f"{where}: a block list holds numbers only")
        if any(is_nonfinite(v) for v in spec):
            raise BadBlockStrengths(f"{where}: a block list holds finite numbers only")
        strengths = _positional([float(v) for v in spec], arch, where)
    elif isinstance(spec, Mapping):
        strengths = _from_patterns(spec, arch, where)
    else:
        raise BadBlockStrengths(f"{where}: give a preset name, a list of numbers or a map of "
                                "block names to numbers")
    strengths["TE"] = strengths.get("BASE", 1.0)
    return strengths


def _map_value(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or is_nonfinite(value):
        raise BadBlockStrengths(f"{where}: the value of {name!r} is {value!r}; block strengths "
                                "are finite numbers, e.g. {'IN*': 0.5}")
    return float(value)


def _preset(name: str, arch: Architecture, where: str) -> dict[str, float]:
    """1 on the preset's blocks, 0 elsewhere. A preset whose blocks this architecture does not
    have (FLUX's double on SD1, in/mid/out on FLUX) would leave the diffusion model out
    silently: refused."""
    patterns = PRESETS[name]
    own = [p for p in patterns if p != "BASE"]
    if own and not any(fnmatch.fnmatchcase(b, p) for b in arch.blocks for p in own):
        raise BadBlockStrengths(f"{where}: {name!r}: no block of {arch.label} is in this preset "
                                f"(see `mergekit-sd blocks {arch.id}`)")
    return {b: float(any(fnmatch.fnmatchcase(b, p) for p in patterns)) for b in arch.blocks}


def _from_patterns(spec: Mapping[str, float], arch: Architecture, where: str) -> dict[str, float]:
    default = _map_value(spec.get("default", 1.0), where, "default")
    patterns = [(str(p), _map_value(v, where, str(p))) for p, v in spec.items() if p != "default"]
    for pattern, _ in patterns:
        absent = [b for b in block_range(pattern) or () if b not in arch.blocks]
        if absent:
            raise BadBlockStrengths(f"{where}: {pattern!r} runs through {absent[0]}, which "
                                    f"{arch.label} lacks (see `mergekit-sd blocks {arch.id}`)")
        if not any(_names(b, pattern) for b in arch.blocks):
            raise BadBlockStrengths(f"{where}: {pattern!r} matches no block of {arch.label} "
                                    f"(see `mergekit-sd blocks {arch.id}`)")
    return {b: next((v for p, v in patterns if _names(b, p)), default) for b in arch.blocks}


def _names(block: str, pattern: str) -> bool:
    """Whether a block map's key names `block`: a shell pattern (`IN*`) or, as merge params
    write them, a run of blocks (`IN00-IN05`)."""
    run = block_range(pattern)
    return block in run if run else fnmatch.fnmatchcase(block, pattern)
