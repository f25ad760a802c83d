"""The estimate of a render's rest from its first batch: the line, when it is said, and what the
runner measures for it. Times are measured ones (README, bench/render_cpu.py: 32.9 s per image
for the demo SD1.5 model at 512x512, 25 steps, on a 2-core CPU), never timed here."""

from __future__ import annotations

import pytest

from mergekit_sd.render.estimate import FirstBatch, estimate_line

DEFAULT_GRID_ON_CPU = FirstBatch(family="sd1", device="cpu", images=4, seconds=32.9, left=12,
                                 later=0, families=1, grid="default", width=512, height=512,
                                 steps=25, preset="standard")


def _first(**changes) -> FirstBatch:
    from dataclasses import replace

    return replace(DEFAULT_GRID_ON_CPU, **changes)


def test_the_default_grid_on_the_cpu_says_the_rest_and_the_faster_settings():
    assert estimate_line(DEFAULT_GRID_ON_CPU) == (
        "first 4 images: 33 s each on the CPU; the 12 left will take about 7 min. Faster for "
        "a first try on the CPU: --grid tiny, --size 256x256 --steps 8 or --preset lcm "
        "(README: Renders and A/B grids)")


def test_the_readme_shows_that_line():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"\n  {estimate_line(DEFAULT_GRID_ON_CPU)}\n" in readme


def test_a_batch_of_one_is_the_first_image():
    assert estimate_line(_first(images=1, left=15)).startswith(
        "first image: 33 s on the CPU; the 15 left will take about 8 min.")


@pytest.mark.parametrize(("seconds", "left", "threshold", "said"), [
    (0.061, 5, None, False),  # --grid tiny: the progress bar is enough
    (5.0, 12, None, False),  # exactly a minute left
    (5.1, 12, None, True),
    (0.95, 14, 10, True),  # a lower threshold, e.g. a test's
    (32.9, 0, 0, False),  # nothing left
])
def test_the_line_is_said_only_when_the_rest_takes_longer_than_the_threshold(
        seconds, left, threshold, said):
    line = estimate_line(_first(seconds=seconds, left=left), threshold)
    assert (line is not None) == said, line


def test_a_gpu_gets_no_cpu_advice_and_an_estimate_that_allows_for_its_warm_up():
    line = estimate_line(_first(device="cuda:0", seconds=6.4, images=2, left=30, width=1024,
                                height=1024, family="sdxl"))
    assert line == "first 2 images: 6.4 s each on cuda:0; the 30 left will take about 3 min or less"


@pytest.mark.parametrize(("changes", "advice"), [
    ({"grid": "tiny", "width": 64, "height": 64, "steps": 30}, "--steps 8 or --preset lcm"),
    ({"preset": "lcm", "steps": 4}, "--grid tiny or --size 256x256"),
    ({"grid": "tiny", "width": 64, "height": 64, "steps": 4}, None),
    ({"family": "flux", "width": 1024, "height": 1024}, "--grid tiny, --size 256x256 --steps 8 "
                                                        "or a few-step --preset"),
])
def test_only_the_faster_settings_not_in_use_are_named(changes, advice):
    line = estimate_line(_first(seconds=100.0, **changes))
    assert line is not None
    if advice is None:
        assert "Faster" not in line, line
    else:
        assert line.endswith(f"Faster for a first try on the CPU: {advice} (README: Renders "
                             "and A/B grids)"), line


def test_several_architectures_name_theirs_and_leave_the_others_to_their_own_line():
    line = estimate_line(_first(families=2, left=8, later=16))
    assert line.startswith("sd1: first 4 images: 33 s each on the CPU; the 8 left will take "
                           "about 4 min, not counting the 16 of other architectures. Faster")


@pytest.mark.parametrize(("seconds", "said"), [(75, "75 s"), (5399, "90 min"), (5400, "1.5 h")])
def test_durations_are_in_the_unit_a_person_reads(seconds, said):
    assert f"about {said}." in estimate_line(_first(seconds=seconds, left=1))


def test_the_runner_tells_each_pipelines_first_batch_with_its_measured_time(tmp_path):
    """Tiny SD1 and SDXL candidates: the first batch of each pipeline is told once, with the
    per-image time the manifest records for it, and the images left after it."""
    pytest.importorskip("torch")
    from mergekit_sd.render.candidates import collect_candidates
    from mergekit_sd.render.grids import load_grid
    from mergekit_sd.render.presets import get_preset
    from mergekit_sd.render.runner import RenderOptions, render_candidates
    from mergekit_sd.testing.checkpoints import write_checkpoint

    for name, variant, seed in [("a", "sd1", 1), ("b", "sd1", 2), ("xl", "sdxl", 3)]:
        write_checkpoint(tmp_path / f"{name}.safetensors", variant, seed=seed)
    told: list[FirstBatch] = []
    options = RenderOptions(load_grid("tiny"), get_preset("standard"), tmp_path / "out",
                            steps=1, batch=4)
    candidates = collect_candidates([str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "xl")])
    result = render_candidates(candidates, options, on_first_batch=told.append)

    sd1, sdxl = told  # the tiny grid: 6 images per candidate, in batches of 4
    assert (sd1.family, sd1.images, sd1.left, sd1.later, sd1.families) == ("sd1", 4, 8, 6, 2)
    assert (sdxl.family, sdxl.images, sdxl.left, sdxl.later) == ("sdxl", 4, 2, 0)
    assert (sd1.device, sd1.grid, sd1.width, sd1.steps, sd1.preset) == (
        "cpu", "tiny", 64, 1, "standard")
    first_images = {e.candidate: e.seconds for e in reversed(result.manifest.images)}
    assert round(sd1.seconds, 4) == first_images["a"] > 0
    assert round(sdxl.seconds, 4) == first_images["xl"] > 0
