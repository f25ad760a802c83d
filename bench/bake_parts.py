"""What five of the bake's mechanisms cost or are worth: `mergekit-sd bake` as shipped against
the same command with one of them undone, each in a child process, interleaved, in the same run.

  one worker             the crew of workers (`lora.bake_crew`) cut to one: the arithmetic on
                         a single core, as before the crew
  4 KiB shared buffers   the chunk and stage buffers as Python's plain anonymous mmap (shared,
                         so the kernel keeps them on small pages) instead of `io.buffers`'
                         private mappings advised onto transparent huge pages
  interpreter teardown   `cli.main` + the normal exit instead of `cli.run`'s quick exit once
                         torch is loaded (`cli_exit`)
  LoRA pages kept        `BakePlan.done_with` a no-op: the mapped LoRA's pages stay in the
                         process until it ends
  no finite check        `finite_or_clamped` a no-op where `lora.bake_run` calls it: the check
                         of a baked tensor for NaN and values beyond its dtype (one read of
                         it, its sum), made only where `lora.bake.delta_bound` does not rule
                         them out (a bound at or over `SAFE_DELTA`, as for every bias and
                         every module not a plain LoRA), is left out, with the clamping that
                         may follow. `delta_bound` is still computed, and `narrow_into` still
                         checks a weight baked in fp32 and narrowed back: this is what the
                         reads cost, not the bound

The case is bench/bake.py's "base known": a full-size SDXL fp16 checkpoint and a kohya rank-64
LoRA, key maps and SHA256s remembered, warm page cache, earlier outputs deleted and the disk
flushed before every run. Prints median wall time and peak RSS per variant and each one's
ratio to the shipped bake; writes bench/results/bake_parts.json.

Run from the repository root: .venv/bin/python bench/bake_parts.py  (about 6 minutes on 2 cores
with the default 5 rounds; needs about 15 GB free in --workdir, default /tmp). --variants NAME...
times only those beside the shipped bake.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/inspect.py would shadow the standard library's `inspect` (torch imports it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import _measure as m  # noqa: E402
from bake import _settle, _warm, generate_models  # noqa: E402

THIS = str(Path(__file__).resolve())
SHIPPED = "as shipped"
VARIANTS = (SHIPPED, "one worker", "4 KiB shared buffers", "interpreter teardown",
            "LoRA pages kept", "no finite check")


def child_bake(variant: str, *argv: str) -> None:
    """`mergekit-sd bake ARGV` with `variant` undone."""
    if variant == "one worker":
        from mergekit_sd.lora import bake_run

        bake_run.cores = lambda: 1
    elif variant == "4 KiB shared buffers":
        import mmap

        from mergekit_sd.io import chunks, direct

        chunks.page_buffer = direct.page_buffer = lambda size: mmap.mmap(-1, size)
    elif variant == "LoRA pages kept":
        from mergekit_sd.lora.bake import BakePlan

        BakePlan.done_with = lambda self, key: None
    elif variant == "no finite check":
        from mergekit_sd.lora import bake_run

        bake_run.finite_or_clamped = lambda *args, **kwargs: None
    from mergekit_sd import cli

    sys.argv = ["mergekit-sd", "bake", *argv]
    (cli.main if variant == "interpreter teardown" else cli.run)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=VARIANTS[1:])
    args = parser.parse_args()
    variants = (SHIPPED, *args.variants)
    m.compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="bench-bake-parts-", dir=args.workdir))
    try:
        base, lora = generate_models(work)
        os.environ["MERGEKIT_SD_CACHE"] = str(work / "cache")
        bake = [str(base), f"{lora}:0.8", "-o", str(work / "baked.safetensors")]
        _settle(work)
        if m.run_child([sys.executable, THIS, "--child", SHIPPED, *bake]).returncode:
            raise SystemExit("the bake that fills the cache failed")  # key maps, SHA256s
        runs: dict[str, list] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            shift = round_ % len(variants)
            for name in variants[shift:] + variants[:shift]:
                _settle(work)
                _warm(base)
                result = m.run_child([sys.executable, THIS, "--child", name, *bake])
                if result.returncode:
                    raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
                runs[name].append(result)
        wall = {n: m.median([r.wall_s for r in rs]) for n, rs in runs.items()}
        peak = {n: max(r.peak_rss for r in rs) for n, rs in runs.items()}
        m.print_table(["", "wall (median)", "/ as shipped", "peak RSS", "/ as shipped"],
                      [[n, f"{wall[n]:.2f} s", f"{wall[n] / wall[SHIPPED]:.2f}x",
                        m.human_bytes(peak[n]), f"{peak[n] / peak[SHIPPED]:.2f}x"]
                       for n in variants])
        m.write_results("bake_parts", {
            "machine": m.machine(), "rounds": args.rounds, "page_cache": "warm",
            "wall_s": {n: [r.wall_s for r in rs] for n, rs in runs.items()},
            "median_s": wall, "peak_rss": peak,
            "vs_shipped": {n: wall[n] / wall[SHIPPED] for n in variants}})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_bake(sys.argv[2], *sys.argv[3:])
    else:
        main()
        os._exit(0)
