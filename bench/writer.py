"""Benchmark of the streaming writer: peak memory while writing a 2 GB file.

Target (from the issue): writing a 2 GB file through the streaming writer keeps peak RSS
under 300 MB. Baseline, measured in the same run: the naive way with the reference library,
every tensor built in a dict and handed to `safetensors.torch.save_file` (peak RSS about the
file size).

Both sides run in child processes of their own, so each peak RSS is that process's alone (the
kernel's ru_maxrss from wait4), and both write the same tensors: a full-size SD1 checkpoint in
F16 (1,130 tensors, 2.13 GB) with the same deterministic random values, generated as they go.
The baseline fsyncs its file after save_file, as the streaming writer does before its rename,
so the wall times compare like for like.

Run from the repository root: .venv/bin/python bench/writer.py  (a minute or two; needs
6 GB free in the work folder, else it says so and skips). Prints a table and a PASS/FAIL line,
writes bench/results/writer.json, deletes what it wrote, and exits 0 whatever the outcome.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _measure as m  # noqa: E402

# The parent stays small on purpose: Linux carries a parent's RSS high-water mark into its
# children across fork+exec, so nothing heavy (torch, the engine) is imported here.

TARGET_PEAK = 300_000_000  # "under 300 MB"
MIN_FREE = 6_000_000_000  # two 2.13 GB files and headroom
VARIANT, DTYPE = "sd1", "F16"


def _vm(field: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(side: str, path: Path) -> None:
    """Child mode: import what the side needs, then write `path` and report."""
    import torch

    from mergekit_sd.testing.checkpoints import (
        checkpoint_specs,
        synthetic_tensor,
        write_checkpoint,
    )

    torch.empty(1).normal_()  # any lazy initialisation of torch happens before the clock
    specs = checkpoint_specs(VARIANT, "full", dtype=DTYPE)
    report = {"side": side, "tensors": len(specs),
              "largest_tensor": max(s.nbytes for s in specs),
              "peak_after_imports": _vm("VmHWM"), "rss_after_imports": _vm("VmRSS")}
    start = time.perf_counter()
    if side == "ours":
        write_checkpoint(path, VARIANT, size="full", fill="random", dtype=DTYPE, seed=0)
        report["write_s"] = time.perf_counter() - start
    elif side == "baseline":
        from safetensors.torch import save_file

        tensors = {s.name: synthetic_tensor(s, 0) for s in specs}
        built = time.perf_counter()
        save_file(tensors, path)
        saved = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        report.update(build_s=built - start, save_s=saved - built,
                      fsync_s=time.perf_counter() - saved,
                      write_s=time.perf_counter() - start,
                      peak_before_save=_vm("VmHWM"))
    report["size"] = path.stat().st_size if side != "imports" else 0
    report["peak_self"] = m.peak_rss_self()
    print(json.dumps(report))


def _run(side: str, path: Path) -> dict:
    done = m.run_child([sys.executable, str(Path(__file__).resolve()), "--child", side,
                        "--path", str(path)], timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{side} child exited {done.returncode}: {done.stderr[-3000:]}")
    report = done.json_line()
    report["peak_rss"] = done.peak_rss  # the kernel's figure for that child, from wait4
    report["wall_s"] = done.wall_s
    return report


def _same_tensors(a: Path, b: Path) -> bool:
    """Both files declare the same names, dtypes and shapes (the header order may differ)."""
    from mergekit_sd.io.header import read_header  # headers only: no torch

    def table(path: Path) -> dict:
        return {n: (t.dtype, t.shape) for n, t in read_header(path).tensors.items()}

    return table(a) == table(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the 2 GB files (default: /tmp)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--child", choices=("ours", "baseline", "imports"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path)
        return

    workdir = args.workdir or Path("/tmp")
    free = m.free_bytes(workdir)
    if free < MIN_FREE:
        print(f"SKIP  writer: only {m.human_bytes(free)} free in {workdir}, the benchmark needs "
              f"{m.human_bytes(MIN_FREE)} (two 2.1 GB files and headroom); use --workdir")
        m.write_results("writer", {"verdict": "SKIP", "free_bytes": free, "workdir": workdir})
        return

    started = time.perf_counter()
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="mergekit-sd-bench-writer-", dir=workdir) as tmp:
        root = Path(tmp)
        imports = _run("imports", root / "unused.safetensors")
        same = None
        for _ in range(args.runs):  # interleaved, so drift on a noisy machine hits both alike
            for side in runs:
                path = root / f"{side}.safetensors"
                runs[side].append(_run(side, path))
            if same is None:
                same = _same_tensors(root / "ours.safetensors", root / "baseline.safetensors")
            for side in runs:
                (root / f"{side}.safetensors").unlink()
    elapsed = time.perf_counter() - started

    def med(side: str, key: str) -> float:
        return m.median([r[key] for r in runs[side]])

    size = runs["ours"][0]["size"]
    ours_peak = max(r["peak_rss"] for r in runs["ours"])
    base_peak = max(r["peak_rss"] for r in runs["baseline"])
    ours_s, base_s = med("ours", "write_s"), med("baseline", "write_s")
    first = runs["ours"][0]
    print(f"\nwrite a full-size {VARIANT} checkpoint in {DTYPE} ({first['tensors']} tensors, "
          f"{m.human_bytes(size)}; largest tensor {m.human_bytes(first['largest_tensor'])}), "
          f"random values generated as written")
    print(f"each side in its own child process; {args.runs} interleaved runs each; peak RSS is "
          "the highest ru_maxrss of the runs, times are medians")
    rows = [
        ["ours: write_checkpoint -> StreamingWriter", m.human_bytes(ours_peak),
         f"{ours_peak / base_peak:.3f}", f"{ours_s:.2f}", f"{size / ours_s / 1e6:.0f}",
         f"{ours_s / base_s:.2f}"],
        ["baseline: dict of tensors -> save_file + fsync", m.human_bytes(base_peak), "1.000",
         f"{base_s:.2f}", f"{size / base_s / 1e6:.0f}", "1.00"],
        ["python + torch + mergekit_sd imports only", m.human_bytes(imports["peak_rss"]),
         f"{imports['peak_rss'] / base_peak:.3f}", "", "", ""],
    ]
    m.print_table(["", "peak RSS", "ratio", "wall s", "MB/s", "ratio"], rows)
    print(f"ours above the imports: {m.human_bytes(ours_peak - imports['peak_rss'])} "
          f"(peak RSS per run: {', '.join(m.human_bytes(r['peak_rss']) for r in runs['ours'])})")
    print(f"baseline: build {med('baseline', 'build_s'):.2f} s, save_file "
          f"{med('baseline', 'save_s'):.2f} s, fsync {med('baseline', 'fsync_s'):.2f} s; "
          f"same names, dtypes and shapes as ours: {same}")
    word = m.verdict("writing a 2 GB file keeps peak RSS < 300 MB", ours_peak < TARGET_PEAK,
                     f"{m.human_bytes(ours_peak)} peak for a {m.human_bytes(size)} file "
                     f"({ours_peak / base_peak:.2f}x the naive save_file's "
                     f"{m.human_bytes(base_peak)}), {size / ours_s / 1e6:.0f} MB/s")
    out = m.write_results("writer", {
        "verdict": word, "variant": VARIANT, "dtype": DTYPE, "file_size": size,
        "runs": runs, "imports_only": imports, "ours_peak_rss": ours_peak,
        "baseline_peak_rss": base_peak, "ratio_peak_rss": ours_peak / base_peak,
        "ours_write_s": ours_s, "baseline_write_s": base_s, "ratio_wall": ours_s / base_s,
        "ours_mb_s": size / ours_s / 1e6, "baseline_mb_s": size / base_s / 1e6,
        "same_tensors": same, "target_peak_rss": TARGET_PEAK, "elapsed_s": elapsed})
    print(f"\nresults in {out.relative_to(m.REPO)} ({elapsed:.0f} s in all)")


if __name__ == "__main__":
    main()
