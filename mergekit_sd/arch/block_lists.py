"""Per-block values written as supermerger and LoRA Block Weight users write them: one value per
block in order (a list, or a comma-separated string), or a named preset.

  [0, 1, 1, ...] / "0,1,1,..."  positional over the architecture's blocks: all of them (SD 26,
                        SDXL 20, FLUX 58, SD3 25/39 values, in `mergekit-sd blocks ARCH` order:
                        supermerger's BASE,IN00,...,OUT11), or LoRA Block Weight's short forms:
                        17 values for SD1/SD2 (BASE IN01 IN02 IN04 IN05 IN07 IN08 M00
                        OUT03-OUT11) and 12 for SDXL (BASE IN04 IN05 IN07 IN08 M00 OUT00-OUT05).
  "all" "none" "in" "mid" "out" "in-mid" "mid-out" "double" "single"
                        named presets: 1 on those blocks (and BASE), 0 elsewhere.

`bake_lora` strengths (`lora.strengths`) and merge parameters (`recipe.params`) share this
parser, so both accept the same forms with the same checks and messages.
"""

from __future__ import annotations

import fnmatch
import math
import re

from mergekit_sd.arch.architectures import Architecture

SHORT_FORMS = {
    "sd": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
           *(f"OUT{i:02d}" for i in range(3, 12))),
    "sdxl": ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
}
PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("*",), "none": (), "in": ("BASE", "IN*"), "mid": ("BASE", "M*"),
    "out": ("BASE", "OUT*"), "in-mid": ("BASE", "IN*", "M*"), "mid-out": ("BASE", "M*", "OUT*"),
    "double": ("BASE", "D*"), "single": ("BASE", "S*"),
}


class BadBlockList(ValueError):
    """A block list or preset that does not fit: its message is one sentence without a place
    (the caller puts the field or option first)."""


class NotABlockList(BadBlockList):
    """Text that is neither numbers nor a preset name."""


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


def sizes_text(arch: Architecture) -> str:
    """How many values a block list for `arch` takes: "26 or 17"."""
    short = SHORT_FORMS.get(arch.family)
    return f"{len(arch.blocks)}" + (f" or {len(short)}" if short else "")


def _numbers(text: str) -> list[float] | None:
    """The comma-separated numbers of `text`; None when it holds no number at all (a preset),
    an error when some are numbers and some not (nan, inf, a typo)."""
    parts = text.split(",")
    values = [plain_number(part) for part in parts]
    if all(v is None for v in values) and len(parts) == 1:
        return None
    bad = next((p for p, v in zip(parts, values, strict=True) if v is None), None)
    if bad is not None:
        raise BadBlockList(f"{bad.strip()!r} in {text!r} is not a finite number; give "
                           "comma-separated numbers such as 1,0,0.5")
    return values


def _positional(values: list[float], arch: Architecture, noun: str) -> dict[str, float]:
    if len(values) == len(arch.blocks):
        return dict(zip(arch.blocks, values, strict=True))
    short = SHORT_FORMS.get(arch.family)
    if short and len(values) == len(short):
        return dict(zip(short, values, strict=True))
    raise BadBlockList(f"{len(values)} {noun} given; {arch.label} takes {sizes_text(arch)} "
                       f"(see `mergekit-sd blocks {arch.id}`)")


def _preset(name: str, arch: Architecture) -> dict[str, float]:
    """1 on the preset's blocks, 0 elsewhere. A preset whose blocks this architecture does not
    have (FLUX's double on SD1, in/mid/out on FLUX) would leave the diffusion model out
    silently: refused."""
    patterns = PRESETS[name]
    own = [p for p in patterns if p != "BASE"]
    if own and not any(fnmatch.fnmatchcase(b, p) for b in arch.blocks for p in own):
        raise BadBlockList(f"{name!r}: no block of {arch.label} is in this preset "
                           f"(see `mergekit-sd blocks {arch.id}`)")
    return {b: float(any(fnmatch.fnmatchcase(b, p) for p in patterns)) for b in arch.blocks}


def listed_blocks(spec: str | list, arch: Architecture, noun: str = "block values"
                  ) -> dict[str, float]:
    """Block name -> value for the blocks `spec` names: every block of `arch` for a full list
    or a preset, the short form's blocks for a short one (the caller decides what the others
    take). `noun` names the values in the length message ("block strengths")."""
    if isinstance(spec, str):
        numbers = _numbers(spec)
        if numbers is not None:
            return _positional(numbers, arch, noun)
        if spec.strip().lower() in PRESETS:
            return _preset(spec.strip().lower(), arch)
        raise NotABlockList(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                           "comma-separated list of numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
        raise BadBlockList("a block list holds numbers only")
    if any(is_nonfinite(v) for v in spec):
        raise BadBlockList("a block list holds finite numbers only")
    return _positional([float(v) for v in spec], arch, noun)
