"""How long the rest of a render will take, from the time its first batch took: one line for
stderr, said only when the rest is long enough to matter, with the README's faster settings
when the images are drawn on the CPU.

The estimate rests on a measurement, never on a figure of ours: the per-image time of the first
batch a pipeline drew (the pipeline build, its LoRA fuse and the swaps left out). On the CPU that
batch's one-time costs are a small part of it: the demo's SD1.5 model drew its first batch of
four 256x256 8-step images in 0.87 s each and the next in 0.80 s, a 64x64 image 0.11 s first
and 0.08-0.10 s after. On a GPU the first batch also pays the device's start-up (its libraries'
first calls), so the estimate says "or less" there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Below a minute left the line is noise: the progress bar's own countdown covers it, and
# stopping to rerun smaller would save less time than reading the advice takes.
WORTH_SAYING_S = 60.0

# The settings the README measures as far faster on the CPU (Renders and A/B grids).
SMALL_SIDE = 256
FEW_STEPS = 8
FEW_STEP_PRESET = {"sd1": "lcm", "sdxl": "lcm"}  # the others' few-step presets fit few models


@dataclass(frozen=True)
class FirstBatch:
    """A pipeline's first batch, measured, and what is left of the render after it."""

    family: str
    device: str
    images: int  # drawn in the batch
    seconds: float  # per image: the batch's time over its images
    left: int  # images this pipeline still draws, at the same size and steps
    later: int  # images of other architectures, not started yet (their own size and steps)
    families: int  # architectures in the render
    grid: str  # the grid's name
    width: int
    height: int
    steps: int
    preset: str


# How to ask for a few-step preset for a family here: `--preset NAME`, with `--pull` where its
# LoRA has to be downloaded first, or None where it cannot be used (offline, its LoRA absent).
FewStep = Callable[[str, str], str | None]


def estimate_line(first: FirstBatch, worth_saying_s: float | None = None,
                  few_step: FewStep | None = None) -> str | None:
    """The line to print, or None when the images left take less than `worth_saying_s`
    (default WORTH_SAYING_S). `few_step(preset, family)` says how the few-step preset can be
    used (the caller knows where its LoRA is); by default plainly `--preset NAME`."""
    threshold = WORTH_SAYING_S if worth_saying_s is None else worth_saying_s
    rest = first.left * first.seconds
    if first.left == 0 or rest <= threshold:
        return None
    on_cpu = first.device == "cpu"
    where = "the CPU" if on_cpu else first.device
    took = (f"first image: {_seconds(first.seconds)}" if first.images == 1 else
            f"first {first.images} images: {_seconds(first.seconds)} each")
    line = (f"{took} on {where}; the {first.left} left will take about {_duration(rest)}"
            f"{'' if on_cpu else ' or less'}")
    if first.families > 1:
        line = f"{first.family}: {line}"
    if first.later:
        line += f", not counting the {first.later} of other architectures"
    faster = faster_options(first, few_step) if on_cpu else []
    if faster:
        line += (f". Faster for a first try on the CPU: {_either(faster)} "
                 "(README: Renders and A/B grids)")
    return line


def faster_options(first: FirstBatch, few_step: FewStep | None = None) -> list[str]:
    """The README's faster CPU settings that this render does not use already, and could."""
    options = [] if first.grid == "tiny" else ["--grid tiny"]
    smaller = ([f"--size {SMALL_SIDE}x{SMALL_SIDE}"]
               if max(first.width, first.height) > SMALL_SIDE else [])
    fewer = [f"--steps {FEW_STEPS}"] if first.steps > FEW_STEPS else []
    if smaller or fewer:
        options.append(" ".join(smaller + fewer))
    # a few-step preset gains by its few steps (and, LCM, by leaving out the negative pass)
    if first.preset == "standard" and first.steps > FEW_STEPS:
        preset = FEW_STEP_PRESET.get(first.family)
        if preset is None:
            options.append("a few-step --preset")
        elif (option := (few_step or _plain)(preset, first.family)) is not None:
            options.append(option)
    return options


def _plain(preset: str, family: str) -> str:
    return f"--preset {preset}"


def _either(options: list[str]) -> str:
    if len(options) == 1:
        return options[0]
    return ", ".join(options[:-1]) + f" or {options[-1]}"


def _seconds(value: float) -> str:
    if value >= 10:
        return f"{value:.0f} s"
    return f"{value:.1f} s" if value >= 1 else f"{value:.2f} s"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
