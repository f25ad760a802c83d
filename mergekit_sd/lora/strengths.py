"""Per-block strengths of a LoRA (LoRA Block Weight style): lists, named presets, block maps.

A block strength multiplies the LoRA's strength on every weight of that block. Forms:

  list / "1,0,0.5,..."  positional over the architecture's blocks: all of them (SD 26, SDXL 20,
                        FLUX 58, SD3 25/39 values, in `mergekit-sd blocks ARCH` order), or
                        LoRA Block Weight's short forms: 17 values for SD1/SD2 (BASE IN01 IN02
                        IN04 IN05 IN07 IN08 M00 OUT03-OUT11) and 12 for SDXL (BASE IN04 IN05 IN07
                        IN08 M00 OUT00-OUT05). Blocks a short form leaves out keep strength 1.
                        As in LoRA Block Weight, the BASE value also scales the text encoders.
  "all" "none" "in" "mid" "out" "in-mid" "mid-out" "double" "single"
                        named presets: 1 on those blocks (and BASE), 0 elsewhere.
  {"IN*": 0.5, "OUT05": 1.2, "default": 1}
                        block names or shell patterns; the first matching entry wins. LoRA
                        Block Weight's MID names the middle block, M00.

Lists and presets are parsed by `arch.block_lists`, which merge parameters' `blocks` share.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

from mergekit_sd.arch.architectures import Architecture, block_range
from mergekit_sd.arch.block_lists import BadBlockList, is_nonfinite, listed_blocks
from mergekit_sd.errors import UserError

BlockSpec = None | str | list[float] | Mapping[str, float]


class BadBlockStrengths(UserError):
    """Block strengths that fit no form: `where` (the option or field) and the problem, apart,
    so that a recipe can put its own place (file, line, field) before the problem."""

    def __init__(self, where: str, problem: str):
        self.problem = problem
        super().__init__(f"{where}: {problem}")


# LoRA arithmetic runs in float32: a strength beyond its range (1e300 is a finite Python float)
# cannot even be handed to it
FLOAT32_MAX = 3.4028234663852886e38


def beyond_float32(value: float) -> bool:
    """Whether `value` is no finite float32 number (NaN, ±inf, or larger than ±3.4e38)."""
    return not math.isfinite(value) or abs(value) > FLOAT32_MAX


def strength_problem(value: float) -> str | None:
    """Why `value` is no strength (None when it is one): not finite, or beyond float32."""
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if abs(value) > FLOAT32_MAX:
        return f"{value:g} is beyond float32's range (±3.4e38), in which LoRAs are applied"
    return None


def block_strengths(spec: BlockSpec, arch: Architecture, where: str = "blocks"
                    ) -> dict[str, float]:
    """Block name -> strength multiplier for every block of `arch`, plus "TE" for the text
    encoders (BASE's value, as LoRA Block Weight does)."""
    strengths = dict.fromkeys(arch.blocks, 1.0)  # blocks a short form leaves out keep 1
    if spec is None or spec == "":
        pass
    elif isinstance(spec, str | list):
        try:
            strengths.update(listed_blocks(spec, arch, "block strengths"))
        except BadBlockList as exc:
            raise BadBlockStrengths(where, str(exc)) from None
    elif isinstance(spec, Mapping):
        strengths = _from_patterns(spec, arch, where)
    else:
        raise BadBlockStrengths(where, "give a preset name, a list of numbers or a map of "
                                       "block names to numbers")
    huge = next((v for v in strengths.values() if beyond_float32(v)), None)
    if huge is not None:
        raise BadBlockStrengths(where, f"{strength_problem(huge)}; give block strengths such "
                                       "as 0.5")
    strengths["TE"] = strengths.get("BASE", 1.0)
    return strengths


def _map_value(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or is_nonfinite(value):
        raise BadBlockStrengths(where, f"the value of {name!r} is {value!r}; block strengths "
                                       "are finite numbers, e.g. {'IN*': 0.5}")
    return float(value)


# LoRA Block Weight's name of the middle block, which `mergekit-sd blocks` calls M00
LBW_NAMES = {"MID": "M00"}


def _from_patterns(spec: Mapping[str, float], arch: Architecture, where: str) -> dict[str, float]:
    default = _map_value(spec.get("default", 1.0), where, "default")
    patterns = [(LBW_NAMES.get(str(p), str(p)) if LBW_NAMES.get(str(p)) in arch.blocks
                 else str(p), _map_value(v, where, str(p)))
                for p, v in spec.items() if p != "default"]
    for pattern, _ in patterns:
        absent = [b for b in block_range(pattern) or () if b not in arch.blocks]
        if absent:
            raise BadBlockStrengths(where, f"{pattern!r} runs through {absent[0]}, which "
                                           f"{arch.label} lacks (see `mergekit-sd blocks "
                                           f"{arch.id}`)")
        if not any(_names(b, pattern) for b in arch.blocks):
            raise BadBlockStrengths(where, f"{pattern!r} matches no block of {arch.label} "
                                           f"(see `mergekit-sd blocks {arch.id}`)")
    return {b: next((v for p, v in patterns if _names(b, p)), default) for b in arch.blocks}


def _names(block: str, pattern: str) -> bool:
    """Whether a block map's key names `block`: a shell pattern (`IN*`) or, as merge params
    write them, a run of blocks (`IN00-IN05`)."""
    run = block_range(pattern)
    return block in run if run else fnmatch.fnmatchcase(block, pattern)
