"""Benchmark behind the writer's O_DIRECT output: the same large file written through
`StreamingWriter` with ordinary (buffered) writes and with O_DIRECT (`io.direct`), the bytes
either copied into its stages or, as a streaming pass's chunk reader places them (at the offset
within a block where they land in the file), written from where they are.

No issue target; it backs the design choice in the README ("Why we write our own safetensors
reader/writer"): wall time and the writing process's CPU time (user + system), buffered as the
baseline, direct as ours, fsync and rename included. Each write runs in a child process of its
own, interleaved in a rotating order, with the previous output deleted and the disk flushed
before every run; times are medians.

Run from the repository root: .venv/bin/python bench/direct_writes.py  (about 2 minutes on 2
cores; needs --gb (default 4) GB free in --workdir, default /tmp). --rounds N (default 3).
Prints a table, writes bench/results/direct_writes.json, exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/inspect.py would shadow the standard library's `inspect`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _measure as m  # noqa: E402

PIECE = 16 << 20
THIS = str(Path(__file__).resolve())


def child_write(out: str, gigabytes: str, mode: str) -> None:
    """Write `gigabytes` GB of random bytes as 16 MB tensors through the streaming writer."""
    from mergekit_sd.io.buffers import page_buffer
    from mergekit_sd.io.direct import BLOCK
    from mergekit_sd.io.writer import StreamingWriter, TensorSpec

    count = int(float(gigabytes) * (1 << 30)) // PIECE
    data = os.urandom(PIECE)  # read-only bytes: copied into the stages
    specs = [TensorSpec(f"t{i:05d}", "U8", (PIECE,)) for i in range(count)]
    before, start = os.times(), time.perf_counter()
    with StreamingWriter(out, specs, direct=(mode != "buffered")) as writer:
        if mode == "direct, in place":  # every tensor starts at the same offset within a block
            shift = writer.file_offset(specs[0].name) % BLOCK
            placed = page_buffer(PIECE + BLOCK)  # as the chunk reader's buffers are
            placed[shift:shift + PIECE] = data
            data = memoryview(placed)[shift:shift + PIECE]
        for spec in specs:
            writer.write_bytes(spec.name, data)
        used = writer.direct_io
    seconds, after = time.perf_counter() - start, os.times()
    print(json.dumps({"seconds": seconds, "user": after.user - before.user,
                      "system": after.system - before.system, "direct_io": used}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if m.free_bytes(args.workdir) < (args.gb + 1) * (1 << 30):
        print(f"skipped: needs {args.gb + 1:.0f} GB free in {args.workdir}")
        return
    m.compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="bench-direct-", dir=args.workdir))
    out = work / "out.safetensors"
    modes = ["buffered", "direct", "direct, in place"]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for round_ in range(args.rounds):
            for mode in modes[round_ % 3:] + modes[:round_ % 3]:
                out.unlink(missing_ok=True)
                os.sync()
                time.sleep(2)
                result = m.run_child([sys.executable, THIS, "--child", str(out), str(args.gb),
                                      mode])
                if result.returncode:
                    raise SystemExit(f"{mode} write failed:\n{result.stderr[-2000:]}")
                runs[mode].append(result.json_line())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {mode: {k: m.median([r[k] for r in rs]) for k in ("seconds", "user", "system")}
           for mode, rs in runs.items()}
    size = int(args.gb * (1 << 30)) // PIECE * PIECE
    m.print_table(["", "wall (median)", "MB/s", "CPU user + sys (median)"],
                  [[mode, f"{med[mode]['seconds']:.2f} s",
                    f"{size / med[mode]['seconds'] / 1e6:.0f}",
                    f"{med[mode]['user']:.2f} + {med[mode]['system']:.2f} s"] for mode in modes])
    cpu = {mode: med[mode]["user"] + med[mode]["system"] for mode in modes}
    for mode in modes[1:]:
        print(f"{mode} / buffered: wall {med[mode]['seconds'] / med['buffered']['seconds']:.2f}x"
              f", CPU {cpu[mode] / cpu['buffered']:.2f}x; O_DIRECT used: "
              f"{all(r['direct_io'] for r in runs[mode])}")
    m.write_results("direct_writes", {"machine": m.machine(), "bytes": size, "runs": runs,
                                      "median": med})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_write(*sys.argv[2:])
    else:
        main()
        os._exit(0)
