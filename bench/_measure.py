"""Shared helpers of the benchmarks: timing medians, a child's peak RSS, bytes read, results.

Rules the benchmarks follow (machines are noisy): every figure is a ratio against a baseline
measured in the same run, from medians of several interleaved runs, with the absolute values
printed for information; peak RSS comes from the kernel's rusage of the measured process, never
from sampling; a script reports PASS/FAIL per target and exits 0 either way (it does not gate).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MB = 1 << 20
GB = 1 << 30


def child_env() -> dict[str, str]:
    """The environment for measured children: the repo importable, no stray output buffering,
    and bytecode caches used as on a user's machine (a shell that sets PYTHONDONTWRITEBYTECODE
    would otherwise make our modules, and only ours, compile from source on every start)."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_bytecode() -> None:
    """Write our .pyc files once, as pip does for installed packages, before timing starts."""
    import compileall

    for package in ("mergekit_sd", "catalog", "tui"):
        compileall.compile_dir(str(REPO / package), quiet=1)


# --- time ----------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_commands(commands: dict[str, Sequence[str]], runs: int, warmups: int = 2,
                  cwd: Path = REPO) -> dict[str, list[float]]:
    """Wall seconds of each command, run interleaved (A B A B ...) so drift hits all alike.

    Output goes to /dev/null; a command that fails is an error (a benchmark of a crash is
    meaningless). The first `warmups` rounds are run and discarded.
    """
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(warmups + runs):
        for name, argv in commands.items():
            start = time.perf_counter()
            done = subprocess.run(list(argv), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, cwd=cwd, env=child_env())
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{name} exited {done.returncode}: "
                                   f"{done.stderr.decode(errors='replace')[-2000:]}")
            if round_ >= warmups:
                times[name].append(elapsed)
    return times


# --- a child process: wall time, its own peak RSS, its output -----------------------------------


@dataclass
class ChildResult:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss: int  # bytes: ru_maxrss of this child alone, from wait4
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # user + system CPU time of this child alone (its threads on all cores)

    def json_line(self) -> dict:
        """The last stdout line that parses as a JSON object (what our child scripts print)."""
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"child printed no JSON (exit {self.returncode}):\n"
                           f"{self.stdout[-2000:]}\n{self.stderr[-2000:]}")


def run_child(argv: Sequence[str], cwd: Path = REPO, timeout: float | None = None
              ) -> ChildResult:
    """Run `argv` and return its wall time and its own peak RSS (wait4's rusage of that pid).

    Unlike getrusage(RUSAGE_CHILDREN), which keeps the maximum over every child ever reaped,
    wait4 gives the figure of this child alone. Linux carries the parent's RSS high-water mark
    into a child across fork+exec, so keep the calling process small (do not import torch in
    a parent that measures children).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=cwd, env=child_env())
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildResult(list(argv), proc.returncode, wall, usage.ru_maxrss * 1024,
                           out.read().decode(errors="replace"),
                           err.read().decode(errors="replace"),
                           usage.ru_utime + usage.ru_stime)


def peak_rss_self() -> int:
    """This process's peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- bytes read ----------------------------------------------------------------------------------


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/io as a dict. `rchar` counts every byte returned by read-like syscalls (page
    cache hits included, any file or pipe), so a delta of it is an upper bound on a file's reads.
    """
    fields = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key.strip()] = int(value)
    return fields


def rchar() -> int:
    return proc_io()["rchar"]


# --- disk, files, results ------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def disk_blocks(path: Path) -> int:
    """Bytes actually allocated on disk (a sparse file's hole costs nothing)."""
    return os.stat(path).st_blocks * 512


def cores() -> int:
    """The cores this process (and so each child) may run on."""
    return len(os.sched_getaffinity(0))


def machine() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "executable": sys.executable}


def write_results(name: str, data: dict) -> Path:
    """bench/results/NAME.json, for the README to quote."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# --- printing ------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table: first column left, the others right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                      strict=True)]
        return "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def verdict(target: str, passed: bool, detail: str) -> str:
    word = "PASS" if passed else "FAIL"
    text = f"{word}  {target}: {detail}"
    print(text)
    return word
