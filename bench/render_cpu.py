"""What a render costs on the CPU, for the README's advice on first tries without a GPU.

`mergekit-sd render` of the demo's SD1.5 model (`demo-sd15-base`, tiny widths) on the CPU, the
default device, in three settings: the default grid's first prompt with its two seeds at the
default grid's size and steps (512x512, 25 steps), the same two images at --size 256x256
--steps 8, and the demo's own `tiny` grid (64x64, 4 steps, six images). Each is a `render`
command in a child process; the time is the manifest's `render_s` (drawing the images, the
pipeline build left out), divided by its images. The default grid's 16 images come to 16 times
the first row's per-image time. A full-size model takes longer: this is a floor.

Run from the repository root: .venv/bin/python bench/render_cpu.py  (about 2 minutes per round
on 2 cores; --rounds N, default 1). Prints a table (medians over the rounds) and writes
bench/results/render_cpu.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/inspect.py would shadow the standard library's `inspect` (torch imports it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import _measure as m  # noqa: E402
import yaml  # noqa: E402

CLI = str(m.REPO / ".venv" / "bin" / "mergekit-sd")
GRIDS = m.REPO / "mergekit_sd" / "render" / "prompt_grids"


def first_prompt_grid(folder: Path) -> Path:
    """The default grid cut to its first prompt (both seeds, its size and steps)."""
    grid = yaml.safe_load((GRIDS / "default.yaml").read_text())
    grid["prompts"] = grid["prompts"][:1]
    path = folder / "first-prompt.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def render_seconds_per_image(model: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    done = m.run_child([CLI, "render", str(model), "--out", str(out), "--overwrite", *extra])
    if done.returncode:
        raise SystemExit(f"render {' '.join(extra)} failed:\n{done.stderr[-2000:]}")
    [candidate] = json.loads((out / "manifest.json").read_text())["candidates"]
    return candidate["render_s"] / candidate["images"], candidate["images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-render-cpu-"))
    try:
        if m.run_child([CLI, "demo-workspace", str(work / "ws")]).returncode:
            raise SystemExit("making the demo workspace failed")
        model = work / "ws" / "models" / "Stable-diffusion" / "demo-sd15-base.safetensors"
        grid = first_prompt_grid(work)
        settings = {
            "default grid's size and steps (512x512, 25 steps)": ["--grid", str(grid)],
            "--size 256x256 --steps 8": ["--grid", str(grid), "--size", "256x256",
                                         "--steps", "8"],
            "--grid tiny (64x64, 4 steps)": ["--grid", "tiny"],
        }
        runs: dict[str, list[float]] = {name: [] for name in settings}
        images: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, extra in settings.items():
                per_image, images[name] = render_seconds_per_image(model, work / "out", extra)
                runs[name].append(per_image)
        per_image = {name: m.median(times) for name, times in runs.items()}
        slowest = next(iter(per_image))
        m.print_table(["demo-sd15-base on the CPU", "images", "s per image", "vs default"],
                      [[name, str(images[name]), f"{per_image[name]:.3f}",
                        f"{per_image[name] / per_image[slowest]:.3f}x"] for name in settings])
        print(f"the default grid's 16 images at that rate: {16 * per_image[slowest]:.0f} s")
        m.write_results("render_cpu", {"machine": m.machine(), "rounds": args.rounds,
                                       "s_per_image": runs, "median_s_per_image": per_image,
                                       "images": images})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
