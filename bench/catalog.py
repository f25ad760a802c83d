"""Benchmark of the catalog: hashing, first scan, rescan, and listing, each against a baseline.

Targets (from the issue), each measured against a baseline in the same run:
  a. hashing throughput >= 0.8x `sha256sum` on the same 2 GB file, both from the page cache,
     while also computing AutoV1, AutoV3 (a second SHA256) and CRC32
  b. a first scan of 1,000 files (headers only) takes < 2 s
     (baselines: the same scan on one process, and the floor: read + json.loads per file)
  c. a rescan of the unchanged files takes < 0.3 s (baseline: walking and stat-ing them)
  d. `list` with a filter over 10,000 entries takes < 200 ms (baseline: the bare SQL query)

Scans and lists run in fresh child processes (a scan's worker pool starts in each, as in a real
`mergekit-sd catalog scan`); whole CLI commands are timed too, for information.

Run from the repository root: .venv/bin/python bench/catalog.py  (a minute or two; about
3 GB of disk, deleted at the end). Prints a table per target and a PASS/FAIL line each, writes
bench/results/catalog.json, and exits 0 whatever the outcome.
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
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _measure as m  # noqa: E402
from _library import build_library, json_floor  # noqa: E402

TARGET_HASH_RATIO = 0.8
TARGET_SCAN_S = 2.0
TARGET_RESCAN_S = 0.3
TARGET_LIST_S = 0.2
HASH_FILE_BYTES = 2 * 10**9
LIST_ENTRIES = 10_000
CLI = [sys.executable, "-m", "mergekit_sd.cli"]

# Child snippets: each prints one JSON line with the seconds of the part measured.
SCAN_CHILD = """
import json, sys, time
from catalog.store import Store
from catalog.edits import add_root
from catalog.scan import scan
from pathlib import Path
if __name__ == "__main__":
    db, folder, jobs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    with Store.open(db) as store:
        add_root(store, folder)
        start = time.perf_counter()
        report = scan(store, jobs=jobs)
        print(json.dumps({"seconds": time.perf_counter() - start, "new": report.new,
                          "unchanged": report.unchanged, "bad": len(report.bad)}))
"""
LIST_CHILD = """
import io, json, sys, time
from catalog.store import Store
from catalog.entries import Filters, list_entries
from catalog.present import show_list
if __name__ == "__main__":
    sink = io.StringIO()
    with Store.open(sys.argv[1]) as store:
        start = time.perf_counter()
        entries = list_entries(store, Filters(kind="lora", search="sd1"))
        show_list(entries, sink.write)
        print(json.dumps({"seconds": time.perf_counter() - start, "rows": len(entries)}))
"""
BARE_SQL_CHILD = """
import json, sqlite3, sys, time
if __name__ == "__main__":
    db = sqlite3.connect(sys.argv[1])
    start = time.perf_counter()
    rows = db.execute("SELECT * FROM files WHERE kind = 'lora' AND instr(lower(name), 'sd1')")
    n = len(rows.fetchall())
    print(json.dumps({"seconds": time.perf_counter() - start, "rows": n}))
"""


def _child(code: str, *args: str) -> dict:
    done = m.run_child([sys.executable, "-c", code, *map(str, args)], timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.json_line()


def _cli_seconds(*args: str) -> float:
    done = m.run_child([*CLI, *map(str, args)], timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.wall_s


def _fresh_db(workdir: Path, name: str) -> Path:
    db = workdir / name
    for stale in workdir.glob(name + "*"):
        stale.unlink()
    return db


# --- a. hashing ----------------------------------------------------------------------------------


def _write_hash_file(path: Path) -> None:
    """A safetensors file of about 2 GB of random bytes (a U8 tensor per 64 MB)."""
    piece = 64 * m.MB
    count = -(-HASH_FILE_BYTES // piece)
    header = {f"t{i:03d}": {"dtype": "U8", "shape": [piece],
                            "data_offsets": [i * piece, (i + 1) * piece]} for i in range(count)}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(count):
            f.write(os.urandom(piece))


def bench_hashing(workdir: Path, rounds: int) -> dict:
    from catalog.hashes import hash_file

    path = workdir / "hash-me.safetensors"
    _write_hash_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:  # into the page cache
        while f.read(64 * m.MB):
            pass
    ours, baseline, single = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        done = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                              check=True)
        baseline.append(time.perf_counter() - start)
        ours.append(m.time_call(lambda: hash_file(path)))
        single.append(m.time_call(lambda: _sha256_only(path)))
    got = hash_file(path)
    assert done.stdout.split()[0] == got.sha256, "sha256sum and ours disagree"
    path.unlink()
    med = {"ours": m.median(ours), "sha256sum": m.median(baseline),
           "python_sha256_only": m.median(single)}
    ratio = med["sha256sum"] / med["ours"]  # throughput ratio: higher is faster
    print(f"\n[a] hashing a {m.human_bytes(size)} safetensors file from the page cache, "
          f"median of {rounds} interleaved rounds")
    m.print_table(["side", "seconds", "GB/s", "throughput vs sha256sum"], [
        ["ours: SHA256 + AutoV1 + AutoV3 + CRC32", f"{med['ours']:.2f}",
         f"{size / med['ours'] / 1e9:.2f}", f"{ratio:.2f}x"],
        ["sha256sum (coreutils)", f"{med['sha256sum']:.2f}",
         f"{size / med['sha256sum'] / 1e9:.2f}", "1.00x"],
        ["info: hashlib SHA256 alone, one thread", f"{med['python_sha256_only']:.2f}",
         f"{size / med['python_sha256_only'] / 1e9:.2f}",
         f"{med['sha256sum'] / med['python_sha256_only']:.2f}x"],
    ])
    word = m.verdict("hashing throughput >= 0.8x sha256sum", ratio >= TARGET_HASH_RATIO,
                     f"{ratio:.2f}x")
    return {"verdict": word, "bytes": size, "rounds": rounds, "median_s": med,
            "runs_s": {"ours": ours, "sha256sum": baseline, "python_sha256_only": single},
            "throughput_ratio": ratio, "target_ratio": TARGET_HASH_RATIO}


def _sha256_only(path: Path) -> None:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * m.MB):
            digest.update(chunk)


# --- b, c. scans ---------------------------------------------------------------------------------


def _walk_stat(folder: Path) -> float:
    start = time.perf_counter()
    for dirpath, _, names in os.walk(folder):
        for name in names:
            os.stat(os.path.join(dirpath, name))
    return time.perf_counter() - start


def bench_scans(workdir: Path, paths: list[Path], rounds: int) -> dict:
    folder = paths[0].parent
    jobs = max(1, min(8, os.cpu_count() or 1))
    first, single, floor, rescan, walk, cli_first, cli_rescan = [], [], [], [], [], [], []
    for _ in range(rounds):
        db = _fresh_db(workdir, "scan.sqlite")
        result = _child(SCAN_CHILD, db, folder, jobs)
        assert result["new"] == len(paths) and result["bad"] == 0, result
        first.append(result["seconds"])
        again = _child(SCAN_CHILD, db, folder, jobs)
        assert again["unchanged"] == len(paths), again
        rescan.append(again["seconds"])
        one = _child(SCAN_CHILD, _fresh_db(workdir, "one.sqlite"), folder, 1)
        single.append(one["seconds"])
        floor.append(json_floor(paths))
        walk.append(_walk_stat(folder))
        db = _fresh_db(workdir, "cli.sqlite")
        _cli_seconds("catalog", "add-root", folder, "--catalog", db)
        cli_first.append(_cli_seconds("catalog", "scan", "--catalog", db))
        cli_rescan.append(_cli_seconds("catalog", "scan", "--catalog", db))
    med = {k: m.median(v) for k, v in {
        "first_scan": first, "first_scan_one_process": single, "floor_read_json": floor,
        "rescan": rescan, "walk_stat": walk, "cli_first_scan": cli_first,
        "cli_rescan": cli_rescan}.items()}
    n = len(paths)
    print(f"\n[b] first scan of {n} files into a new catalog ({jobs} worker processes), "
          f"headers only, page cache warm; median of {rounds} rounds")
    m.print_table(["side", "seconds", "ms/file", "vs one process"], [
        [f"ours: scan, {jobs} workers", f"{med['first_scan']:.2f}",
         f"{med['first_scan'] / n * 1e3:.2f}",
         f"{med['first_scan'] / med['first_scan_one_process']:.2f}x"],
        ["baseline: the same scan on one process", f"{med['first_scan_one_process']:.2f}",
         f"{med['first_scan_one_process'] / n * 1e3:.2f}", "1.00x"],
        ["floor: read + json.loads only, one process", f"{med['floor_read_json']:.2f}",
         f"{med['floor_read_json'] / n * 1e3:.2f}", ""],
        ["info: whole `mergekit-sd catalog scan`", f"{med['cli_first_scan']:.2f}", "", ""],
    ])
    scan_word = m.verdict("first scan of 1,000 files < 2 s", med["first_scan"] < TARGET_SCAN_S,
                          f"{med['first_scan']:.2f} s")
    print(f"\n[c] rescan of the {n} unchanged files; median of {rounds} rounds")
    m.print_table(["side", "seconds", "vs walk + stat"], [
        ["ours: scan (nothing changed)", f"{med['rescan']:.3f}",
         f"{med['rescan'] / med['walk_stat']:.2f}x"],
        ["baseline: os.walk + stat of every file", f"{med['walk_stat']:.3f}", "1.00x"],
        ["info: whole `mergekit-sd catalog scan`", f"{med['cli_rescan']:.3f}", ""],
    ])
    rescan_word = m.verdict("rescan of unchanged files < 0.3 s", med["rescan"] < TARGET_RESCAN_S,
                            f"{med['rescan'] * 1e3:.0f} ms")
    return {"first_scan": {"verdict": scan_word, "files": n, "jobs": jobs,
                           "target_s": TARGET_SCAN_S},
            "rescan": {"verdict": rescan_word, "target_s": TARGET_RESCAN_S},
            "median_s": med, "runs_s": {"first_scan": first, "one_process": single,
                                        "floor": floor, "rescan": rescan, "walk_stat": walk,
                                        "cli_first_scan": cli_first, "cli_rescan": cli_rescan}}


# --- d. list -------------------------------------------------------------------------------------


def _catalog_of(workdir: Path, folder: Path, entries: int) -> Path:
    """A catalog of `entries` rows: the library scanned once, its rows copied under new paths
    (as a library ten times larger would look), each copy with a tag."""
    db = _fresh_db(workdir, "list.sqlite")
    _child(SCAN_CHILD, db, folder, 2)
    import sqlite3

    con = sqlite3.connect(db)
    base = con.execute("SELECT count(*) FROM files").fetchone()[0]
    columns = [r[1] for r in con.execute("PRAGMA table_info(files)") if r[1] not in ("id",
                                                                                    "path")]
    cols = ", ".join(columns)
    copy = 1
    while con.execute("SELECT count(*) FROM files").fetchone()[0] < entries:
        con.execute(f"INSERT INTO files (path, {cols}) SELECT path || '.copy{copy}', {cols} "
                    f"FROM files WHERE path NOT LIKE '%.copy%' LIMIT ?",
                    (entries - con.execute("SELECT count(*) FROM files").fetchone()[0],))
        copy += 1
    con.execute("INSERT INTO tags (file_id, tag) SELECT id, 'tag' || (id % 7) FROM files")
    con.commit()
    total = con.execute("SELECT count(*) FROM files").fetchone()[0]
    con.close()
    assert total == entries, (total, base)
    return db


def bench_list(workdir: Path, folder: Path, rounds: int) -> dict:
    db = _catalog_of(workdir, folder, LIST_ENTRIES)
    ours, bare, cli = [], [], []
    rows = None
    for _ in range(rounds):
        result = _child(LIST_CHILD, db)
        ours.append(result["seconds"])
        rows = result["rows"]
        bare.append(_child(BARE_SQL_CHILD, db)["seconds"])
        cli.append(_cli_seconds("catalog", "list", "--kind", "lora", "--search", "sd1",
                                "--catalog", db))
    med = {"ours": m.median(ours), "bare_sql": m.median(bare), "cli": m.median(cli)}
    print(f"\n[d] list --kind lora --search sd1 over {LIST_ENTRIES:,} entries ({rows} match), "
          f"query and table; median of {rounds} rounds")
    m.print_table(["side", "ms", "vs bare SQL"], [
        ["ours: list_entries + table", f"{med['ours'] * 1e3:.1f}",
         f"{med['ours'] / med['bare_sql']:.2f}x"],
        ["baseline: bare SQL query, fetchall", f"{med['bare_sql'] * 1e3:.1f}", "1.00x"],
        ["info: whole `mergekit-sd catalog list ...`", f"{med['cli'] * 1e3:.0f}", ""],
    ])
    word = m.verdict("list with a filter over 10,000 entries < 200 ms",
                     med["ours"] < TARGET_LIST_S, f"{med['ours'] * 1e3:.0f} ms")
    return {"verdict": word, "entries": LIST_ENTRIES, "rows": rows, "median_s": med,
            "runs_s": {"ours": ours, "bare_sql": bare, "cli": cli}, "target_s": TARGET_LIST_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    m.compile_bytecode()

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-catalog-", dir=args.workdir))
    try:
        hashing = bench_hashing(workdir, args.rounds)
        paths, _ = build_library(workdir, args.files)
        scans = bench_scans(workdir, paths, args.rounds)
        listing = bench_list(workdir, paths[0].parent, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = m.write_results("catalog", {"elapsed_s": time.perf_counter() - started,
                                      "hashing": hashing, "scans": scans, "list": listing})
    print(f"\nresults: {out.relative_to(m.REPO)}")


if __name__ == "__main__":
    main()
