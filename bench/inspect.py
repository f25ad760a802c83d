"""Benchmark of `mergekit-sd inspect`: identification speed, bytes read, process start.

Targets (from the issue), each measured against a baseline in the same run:
  a. identifying 1,000 files of mixed kinds takes under 2 s
     (baseline: the reference library's own header read, safe_open + keys() + metadata())
  b. inspecting a 6.9 GB SDXL-size file reads under 1 MB of it (bytes counted, not timed)
  c. `mergekit-sd inspect FILE` as a whole process takes <= 2x
     `python -c "import safetensors, rich, typer"`

Run from the repository root: .venv/bin/python bench/inspect.py  (under a minute; the model
files are sparse, so the 1,000 files cost about 0.5 GB of disk). Prints a table per target and
a PASS/FAIL line each, writes bench/results/inspect.json, and exits 0 whatever the outcome.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# This file is named inspect.py: left as sys.path[0] it would shadow the standard library's
# `inspect` for every later import of it (dataclasses, typer, torch ...). Move its folder to the
# end of the path, and put the repository root first so `import mergekit_sd` works.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _measure as m  # noqa: E402
from _library import build_library, json_floor  # noqa: E402

from mergekit_sd.arch.identify import identify  # noqa: E402
from mergekit_sd.inspect_report import inspect_file  # noqa: E402
from mergekit_sd.io.header import read_header  # noqa: E402
from mergekit_sd.testing import (  # noqa: E402
    CHECKPOINT_VARIANTS,
    LORA_FORMATS,
    write_checkpoint,
)

TARGET_TOTAL_S = 2.0
TARGET_BYTES = 1_000_000  # "under 1 MB"
TARGET_START_RATIO = 2.0


# --- target a ------------------------------------------------------------------------------------
# Each side is timed in a child process of its own: `safe_open(path, "pt")` imports torch, whose
# ~160,000 Python objects would slow every later garbage collection of our header parsing in a
# shared process (by a third, measured), and `mergekit-sd inspect` never imports torch.


def pass_ours(paths: list[Path], kinds: list[str], subset: list[bool]) -> dict[str, float]:
    """One pass of read_header + identify over every file; wall total plus per-part sums."""
    sums = {"header": 0.0, "identify": 0.0, "lora": 0.0, "checkpoint": 0.0, "subset": 0.0}
    clock = time.perf_counter
    start = clock()
    for path, kind, in_subset in zip(paths, kinds, subset, strict=True):
        t0 = clock()
        header = read_header(path)
        t1 = clock()
        identify(header)
        t2 = clock()
        sums["header"] += t1 - t0
        sums["identify"] += t2 - t1
        sums[kind] += t2 - t0
        if in_subset:
            sums["subset"] += t2 - t0
    sums["total"] = clock() - start
    return sums


def pass_reference(paths: list[Path]) -> float:
    """One pass of the reference library's header read (it identifies nothing)."""
    from safetensors import safe_open

    start = time.perf_counter()
    for path in paths:
        with safe_open(path, "pt") as f:
            f.keys()
            f.metadata()
    return time.perf_counter() - start


def reference_openable(paths: list[Path]) -> tuple[list[Path], dict[str, dict]]:
    """Warm-up pass of the reference: the files it can open, and per kind of file it cannot
    open, how many and why."""
    from safetensors import safe_open

    ok, failed = [], {}
    for path in paths:
        try:
            with safe_open(path, "pt") as f:
                f.keys()
                f.metadata()
            ok.append(path)
        except Exception as exc:  # the reference library raises plain exceptions
            kind = path.name.split("-", 1)[1].removesuffix(".safetensors")
            error = f"{type(exc).__name__}: {exc}".replace(str(path), "FILE")
            entry = failed.setdefault(kind, {"files": 0, "error": error})
            entry["files"] += 1
    return ok, failed


def child_identify(side: str, listing: Path) -> None:
    """Child mode: serve timing passes over the files listed (path, kind, opened by the
    reference) one command line at a time, so the parent can interleave the two sides."""
    rows = [line.split("\t") for line in listing.read_text().splitlines()]
    paths = [Path(r[0]) for r in rows]
    kinds = [r[1] for r in rows]
    subset = [r[2] == "1" for r in rows]
    openable: list[Path] = []
    for command in sys.stdin:
        command = command.strip()
        if command == "warm" and side == "reference":
            openable, failed = reference_openable(paths)
            answer: object = {"openable": [str(p) for p in openable], "failed": failed}
        elif command == "warm":  # lazy imports, and every header in the page cache
            for path in paths:
                identify(read_header(path))
            answer = {}
        elif command == "pass" and side == "reference":
            answer = {"total": pass_reference(openable)}
        elif command == "pass":
            answer = pass_ours(paths, kinds, subset)
        elif command == "floor":
            answer = {"total": json_floor(paths)}
        else:
            break
        print(json.dumps(answer), flush=True)


class _Side:
    """A child process serving one side's passes (see child_identify)."""

    def __init__(self, side: str, listing: Path):
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", side,
             "--listing", str(listing)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=m.REPO,
            env=m.child_env())

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} child died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.wait()


# The way a catalog scan identifies files: worker processes started fresh (a new process each
# pass, so the pool's start-up is counted), headers read, validated and identified.
_PARALLEL = r"""
import json, sys, time
from catalog.scan import examine_files
if __name__ == "__main__":
    paths = [line.split("\t")[0] for line in open(sys.argv[1]).read().splitlines()]
    start = time.perf_counter()
    facts = list(examine_files(paths, int(sys.argv[2])))
    assert all(f.status == "ok" for f in facts)
    print(json.dumps({"total": time.perf_counter() - start}))
"""


def bench_identify(paths: list[Path], kinds: dict[Path, str], passes: int, root: Path) -> dict:
    n = len(paths)
    n_lora = sum(1 for p in paths if kinds[p] == "lora")
    n_ckpt = n - n_lora
    listing = root / "listing.tsv"
    listing.write_text("".join(f"{p}\t{kinds[p]}\t0\n" for p in paths))
    ours_runs, ref_runs, floor_runs, parallel_runs = [], [], [], []
    jobs = max(1, min(8, os.cpu_count() or 1))
    sides: list[_Side] = []
    try:
        reference = _Side("reference", listing)
        sides.append(reference)
        found = reference.ask("warm")
        opened = set(found["openable"])
        listing.write_text("".join(f"{p}\t{kinds[p]}\t{int(str(p) in opened)}\n"
                                   for p in paths))
        ours = _Side("ours", listing)
        sides.append(ours)
        ours.ask("warm")
        for _ in range(passes):  # interleaved, so drift on a noisy machine hits both alike
            ours_runs.append(ours.ask("pass"))
            ref_runs.append(reference.ask("pass")["total"])
            floor_runs.append(ours.ask("floor")["total"])
            done = m.run_child([sys.executable, "-c", _PARALLEL, str(listing), str(jobs)])
            parallel_runs.append(done.json_line()["total"])
    finally:
        for side in sides:
            side.close()
    med = {k: m.median([r[k] for r in ours_runs]) for k in ours_runs[0]}
    ref = m.median(ref_runs)
    floor = m.median(floor_runs)
    parallel = m.median(parallel_runs)
    n_ref = len(opened)

    def row(label: str, files: int, seconds: float, ratio: str = "") -> list:
        return [label, files, f"{seconds:.3f}", f"{1000 * seconds / max(files, 1):.2f}", ratio]

    rows = [
        row(f"ours: as a catalog scan does, {jobs} worker processes", n, parallel),
        row("ours: read_header + identify, one process", n, med["total"]),
        row("  of which read_header", n, med["header"]),
        row("  of which identify", n, med["identify"]),
        row(f"  {n_lora} tiny LoRAs ({len(LORA_FORMATS)} formats)", n_lora, med["lora"]),
        row(f"  {n_ckpt} checkpoints/components", n_ckpt, med["checkpoint"]),
        row("  floor: read + json.loads only, no checks", n, floor),
        row("ours on the files the reference opens", n_ref, med["subset"],
            f"{med['subset'] / ref:.2f}"),
        row("reference: safe_open + keys + metadata", n_ref, ref, "1.00"),
    ]
    print(f"\n[a] identify {n} files: {n_lora} tiny LoRAs of {len(LORA_FORMATS)} formats, "
          f"{n_ckpt} sparse full-size F16 checkpoints/components of "
          f"{len(CHECKPOINT_VARIANTS)} variants")
    print(f"    one child process per side, page cache warm (a warm-up pass first), median of "
          f"{passes} interleaved passes")
    m.print_table(["", "files", "total s", "ms/file", "ratio"], rows)
    failed = found["failed"]
    if failed:
        print(f"    the reference cannot open {n - n_ref} of the files (left out of its pass and "
              "of the ratio):")
        for kind, entry in sorted(failed.items()):
            print(f"      {entry['files']} x {kind}: {entry['error'][:100]}")
    word = m.verdict("a. identify 1,000 files < 2 s", parallel < TARGET_TOTAL_S,
                     f"{parallel:.3f} s for {n} files on {jobs} worker processes "
                     f"({med['total']:.3f} s on one; {med['subset'] / ref:.2f}x the "
                     "reference's header read there)")
    return {"verdict": word, "files": n, "loras": n_lora, "checkpoints": n_ckpt,
            "passes": passes, "page_cache": "warm", "parallel_jobs": jobs,
            "parallel_median_s": parallel, "parallel_runs_s": parallel_runs,
            "ours_median_s": med,
            "ours_runs": ours_runs, "json_floor_s": floor, "json_floor_runs_s": floor_runs,
            "reference_files": n_ref, "reference_median_s": ref, "reference_runs_s": ref_runs,
            "ratio_ours_over_reference": med["subset"] / ref, "reference_failures": failed,
            "target_s": TARGET_TOTAL_S}


# --- target b ------------------------------------------------------------------------------------

# A child that runs the CLI twice in one process; the second run's rchar delta is what one
# `inspect FILE` reads once every import is done.
_CLI_TWICE = r"""
import json, os, sys
from mergekit_sd.cli import main
def rchar():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("rchar:")).split(":")[1])
def once():
    sys.argv = ["mergekit-sd", "inspect", FILE]
    saved, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        main()
    except SystemExit as exc:
        return exc.code
    finally:
        sys.stdout.close()
        sys.stdout = saved
codes = [once()]
before = rchar()
codes.append(once())
print(json.dumps({"codes": codes, "second_run_rchar": rchar() - before}))
"""

# A whole `mergekit-sd inspect FILE` process that records, at exit, its rchar and the modules it
# imported; and a twin that imports exactly those modules and nothing else. Their difference is
# what the process read beyond its imports: the file, and any data table the command loads.
_DUMP_AT_EXIT = r"""
import atexit, json, os, sys
def _dump():
    with open("/proc/self/io") as f:
        rchar = int(next(l for l in f if l.startswith("rchar:")).split(":")[1])
    with open(os.environ["BENCH_DUMP"], "w") as f:
        json.dump({"rchar": rchar, "modules": list(sys.modules)}, f)
atexit.register(_dump)
"""
_CLI_ONCE = _DUMP_AT_EXIT + r"""
sys.argv = ["mergekit-sd", "inspect", FILE]
from mergekit_sd.cli import main
main()
"""
_IMPORTS_ONLY = _DUMP_AT_EXIT + r"""
import importlib
for name in os.environ["BENCH_MODULES"].split(","):
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""


def _python_child(code: str, file: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code.replace("FILE", repr(str(file)))],
                          capture_output=True, text=True, cwd=m.REPO,
                          env={**m.child_env(), **env}, timeout=300)


def whole_process_rchar(file: Path, workdir: Path) -> dict:
    dump = workdir / "io-dump.json"
    cli = _python_child(_CLI_ONCE, file, {"BENCH_DUMP": str(dump)})
    if cli.returncode != 0:
        raise RuntimeError(f"inspect child exited {cli.returncode}: {cli.stderr[-2000:]}")
    a = json.loads(dump.read_text())
    modules = [name for name in a["modules"] if name not in ("__main__", "_frozen_importlib")]
    imports = _python_child(_IMPORTS_ONLY, file, {"BENCH_DUMP": str(dump),
                                                   "BENCH_MODULES": ",".join(modules)})
    if imports.returncode != 0:
        raise RuntimeError(f"imports child exited {imports.returncode}: {imports.stderr[-2000:]}")
    b = json.loads(dump.read_text())
    dump.unlink()
    return {"cli_process_rchar": a["rchar"], "imports_only_rchar": b["rchar"],
            "difference": a["rchar"] - b["rchar"], "modules": len(modules)}


def bench_bytes_read(sdxl: Path, workdir: Path) -> dict:
    size = sdxl.stat().st_size
    inspect_file(sdxl)  # warm: imports and any table identification loads once
    before = m.rchar()
    report = inspect_file(sdxl)
    in_process = m.rchar() - before
    twice = _python_child(_CLI_TWICE, sdxl, {})
    if twice.returncode != 0:
        raise RuntimeError(f"CLI child exited {twice.returncode}: {twice.stderr[-2000:]}")
    cli = json.loads(twice.stdout.strip().splitlines()[-1])
    whole = whole_process_rchar(sdxl, workdir)
    rows = [
        ["file size (st_size)", f"{size:,}", m.human_bytes(size), ""],
        ["on disk (sparse)", f"{m.disk_blocks(sdxl):,}", m.human_bytes(m.disk_blocks(sdxl)), ""],
        ["header_bytes reported by inspect", f"{report['header_bytes']:,}",
         m.human_bytes(report["header_bytes"]), f"{report['header_bytes'] / size:.2e}"],
        ["rchar of inspect_file(), in-process", f"{in_process:,}", m.human_bytes(in_process),
         f"{in_process / size:.2e}"],
        ["rchar of CLI main() 2nd run, in one process", f"{cli['second_run_rchar']:,}",
         m.human_bytes(cli["second_run_rchar"]), f"{cli['second_run_rchar'] / size:.2e}"],
        ["whole CLI process minus same imports", f"{whole['difference']:,}",
         m.human_bytes(whole["difference"]), f"{whole['difference'] / size:.2e}"],
    ]
    print(f"\n[b] bytes read to inspect a sparse full-size SDXL in F16 ({report['label']}, "
          f"{len(read_header(sdxl).tensors)} tensors)")
    print("    rchar (/proc/self/io) counts every byte any read syscall returned, page cache hits "
          "included: an upper bound")
    m.print_table(["", "bytes", "", "of file"], rows)
    print(f"    (whole process: {whole['cli_process_rchar']:,} B read in all, "
          f"{whole['imports_only_rchar']:,} B by a twin importing the same "
          f"{whole['modules']} modules)")
    word = m.verdict("b. inspecting a 6.9 GB SDXL reads < 1 MB", in_process < TARGET_BYTES,
                     f"{in_process:,} B read in-process ({in_process / size:.1e} of "
                     f"{m.human_bytes(size)}); header {report['header_bytes']:,} B")
    return {"verdict": word, "file_size": size, "header_bytes": report["header_bytes"],
            "rchar_in_process": in_process, "rchar_cli_second_run": cli["second_run_rchar"],
            "whole_process": whole, "ratio_read_over_size": in_process / size,
            "target_bytes": TARGET_BYTES}


# --- target c ------------------------------------------------------------------------------------


def _importtime(argv: list[str], runs: int = 3) -> dict[str, int]:
    """Self time (us) of each module a command imports, from python -X importtime: the
    smallest of `runs` runs, as one run on a noisy machine is too jumpy."""
    times: dict[str, int] = {}
    for _ in range(runs):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=m.REPO,
                              env={**m.child_env(), "PYTHONPROFILEIMPORTTIME": "1"})
        for line in done.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if match:
                name, us = match.group(4), int(match.group(1))
                times[name] = min(us, times.get(name, us))
    return times


def bench_start(sdxl: Path, runs: int) -> dict:
    script = Path(sys.executable).parent / "mergekit-sd"
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "mergekit_sd.cli"]
    commands = {
        "mergekit-sd inspect FILE": [*cli, "inspect", str(sdxl)],
        'python -c "import safetensors, rich, typer"':
            [sys.executable, "-c", "import safetensors, rich, typer"],
    }
    times = m.time_commands(commands, runs=runs, warmups=2)
    ours, base = (m.median(t) for t in times.values())
    ratio = ours / base
    print(f"\n[c] whole-process start: {' '.join(cli)} inspect SDXL-FILE > /dev/null, against the "
          f"bare imports; {runs} interleaved runs each after 2 warm-ups, medians")
    m.print_table(["command", "median s", "min s", "max s", "ratio"], [
        [name, f"{m.median(t):.3f}", f"{min(t):.3f}", f"{max(t):.3f}",
         f"{m.median(t) / base:.2f}"] for name, t in times.items()])
    # where the difference goes: modules the command imports that the baseline does not
    ours_imports = _importtime([*cli, "inspect", str(sdxl)])
    base_imports = _importtime(list(commands['python -c "import safetensors, rich, typer"']))
    extra = {k: v for k, v in ours_imports.items() if k not in base_imports}
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:8]
    extra_ms = sum(extra.values()) / 1000
    word = m.verdict("c. inspect process <= 2x the bare imports", ratio <= TARGET_START_RATIO,
                     f"{ours:.3f} s vs {base:.3f} s = {ratio:.2f}x")
    if word == "FAIL" or ratio > 0.75 * TARGET_START_RATIO:
        print(f"    imports the baseline does not make: {len(extra)} modules, "
              f"{extra_ms:.0f} ms self time in all (-X importtime, best of 3); largest:")
        for name, us in top:
            print(f"      {us / 1000:7.1f} ms  {name}")
    return {"verdict": word, "command": [*cli, "inspect", "FILE"], "runs": runs,
            "times_s": times, "ours_median_s": ours, "baseline_median_s": base,
            "ratio": ratio, "target_ratio": TARGET_START_RATIO,
            "extra_imports": {"count": len(extra), "self_ms": extra_ms,
                              "largest_ms": {k: v / 1000 for k, v in top}}}


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to create the temporary files (default: /tmp)")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15, help="runs per command for target c")
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    m.compile_bytecode()
    if args.child:
        child_identify(args.child, args.listing)
        return

    results: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergekit-sd-bench-inspect-",
                                     dir=args.workdir or "/tmp") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths, kinds = build_library(root, args.files)
        sdxl = write_checkpoint(root / "sdxl-f16.safetensors", "sdxl", size="full",
                                fill="sparse", dtype="F16")
        on_disk = sum(m.disk_blocks(p) for p in paths)
        print(f"setup: {len(paths)} files in {time.perf_counter() - t0:.1f} s, "
              f"{m.human_bytes(sum(p.stat().st_size for p in paths))} apparent, "
              f"{m.human_bytes(on_disk)} on disk, in {root}")
        results["identify"] = bench_identify(paths, kinds, args.passes, root)
        results["bytes_read"] = bench_bytes_read(sdxl, root)
        results["start"] = bench_start(sdxl, args.runs)
    elapsed = time.perf_counter() - started
    out = m.write_results("inspect", {"elapsed_s": elapsed, **results})
    print(f"\nresults in {out.relative_to(m.REPO)} ({elapsed:.0f} s in all)")


if __name__ == "__main__":
    main()
