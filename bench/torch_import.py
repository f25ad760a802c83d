"""Benchmark of `cli_startup.import_torch`: importing torch with the cyclic collector paused.

A bake cannot compute anything until torch is imported, so the import is on its critical path.
Each round starts two fresh interpreters, interleaved: one runs a plain `import torch`, the
other `import_torch()`; each times only the import itself (not the interpreter's start) and
prints it. No target of its own: it backs the figure quoted in `mergekit_sd/cli_startup.py`.

Run from the repository root: .venv/bin/python bench/torch_import.py  (about a minute).
--rounds N (default 10). Prints medians and their ratio, writes bench/results/torch_import.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/inspect.py would shadow the standard library's `inspect` (torch imports it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]

import _measure as m  # noqa: E402

PLAIN = "plain import torch"
PAUSED = "import_torch (collector paused)"
TIMED = ("import json, time\n"
         "start = time.perf_counter()\n"
         "{}\n"
         "print(json.dumps({{'seconds': time.perf_counter() - start}}))\n")
CHILDREN = {
    PLAIN: TIMED.format("import torch"),
    PAUSED: TIMED.format("from mergekit_sd.cli_startup import import_torch\nimport_torch()"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    m.compile_bytecode()
    seconds: dict[str, list[float]] = {name: [] for name in CHILDREN}
    for round_ in range(args.rounds + 1):  # the first round warms the page cache, unkept
        for name, script in CHILDREN.items():
            done = m.run_child([sys.executable, "-c", script])
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
            if round_:
                seconds[name].append(done.json_line()["seconds"])
    medians = {name: m.median(values) for name, values in seconds.items()}
    ratio = medians[PAUSED] / medians[PLAIN]
    m.print_table(["import", "median", "/ plain"],
                  [[name, f"{value:.3f} s", f"{value / medians[PLAIN]:.2f}x"]
                   for name, value in medians.items()])
    print(f"import_torch takes {ratio:.2f}x the time of a plain import "
          f"(medians of {args.rounds} interleaved rounds)")
    m.write_results("torch_import", {"rounds": args.rounds, "seconds": seconds,
                                     "median_s": medians, "paused_vs_plain": ratio})


if __name__ == "__main__":
    main()
