"""Several processes on one catalog, and a scan killed with SIGKILL: nothing locked, lost or
doubled, and the catalog opens and rescans afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from catalog.edits import add_root
from catalog.scan import scan
from catalog.store import Store
from mergekit_sd.testing import write_lora

ROOT = Path(__file__).resolve().parent.parent

# Each worker runs for SECONDS and prints one JSON line: what it did and every error it met.
WORKER = textwrap.dedent('''
    import json, os, shutil, sys, time
    from pathlib import Path
    from catalog.store import Store
    from catalog.scan import scan
    from catalog.entries import Filters, list_entries, find_entry
    from catalog.edits import set_tags

    role, db, folder, seconds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    store = Store.open(db)
    done, errors, end = 0, [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if role == "scanner":
                # a new file each round, then a scan: rows are added while others read and tag
                shutil.copy(folder / "lora-000.safetensors", folder / f"new-{done:03d}.safetensors")
                scan(store, jobs=1)
            elif role == "tagger":
                entry = find_entry(store, "lora-%03d" % (done % 20))
                set_tags(store, entry, [f"t{done}"], [])
            else:
                rows = list_entries(store, Filters(search="lora"))
                assert len({r.path for r in rows}) == len(rows), "a row listed twice"
            done += 1
        except Exception as exc:  # every error is reported, none ends the worker
            errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"role": role, "done": done, "errors": errors[:5]}))
''')


def _library(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    write_lora(folder / "lora-000.safetensors", "kohya-sd1")
    for i in range(1, n):
        shutil.copy(folder / "lora-000.safetensors", folder / f"lora-{i:03d}.safetensors")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_three_processes_scan_tag_and_list_at_once(tmp_path):
    folder = tmp_path / "models"
    _library(folder, 20)
    db = tmp_path / "catalog.sqlite"
    with Store.open(db) as store:
        add_root(store, folder)
        scan(store, jobs=1)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    seconds = "6"
    workers = [subprocess.Popen([sys.executable, str(script), role, str(db), str(folder), seconds],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(), cwd=ROOT)
               for role in ("scanner", "tagger", "lister")]
    results = {}
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        results[result["role"]] = result
    for result in results.values():
        assert result["errors"] == [], result
        assert result["done"] > 0, result
    with Store.open(db) as store:
        scan(store, jobs=1)  # pick up the scanner's last copy if its scan was cut by the clock
        files = sorted(p.name for p in folder.iterdir())
        rows = store.db.execute("SELECT path FROM files ORDER BY path").fetchall()
        assert sorted(Path(r[0]).name for r in rows) == files  # none lost, none doubled
        tags = {r[0] for r in store.db.execute("SELECT tag FROM tags")}
        assert tags == {f"t{i}" for i in range(results["tagger"]["done"])}  # no tag lost


KILLED_SCAN = textwrap.dedent('''
    import sys, time
    import catalog.scan as scan_module
    from catalog.store import Store

    real = scan_module.examine
    def slow(path):  # slow enough that the kill lands mid-scan, after the first batch landed
        time.sleep(0.004)
        return real(path)
    scan_module.examine = slow
    scan_module.BATCH = 50
    with Store.open(sys.argv[1]) as store:
        scan_module.scan(store, jobs=1)
    print("finished")
''')


def test_kill_9_during_a_scan_leaves_a_catalog_that_opens_and_rescans(tmp_path):
    folder = tmp_path / "models"
    _library(folder, 400)
    db = tmp_path / "catalog.sqlite"
    with Store.open(db) as store:
        add_root(store, folder)
    script = tmp_path / "scan.py"
    script.write_text(KILLED_SCAN)
    proc = subprocess.Popen([sys.executable, str(script), str(db)], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    landed = 0
    while time.monotonic() < deadline and landed < 100:
        time.sleep(0.05)
        with sqlite3.connect(db, timeout=10) as probe:
            landed = probe.execute("SELECT count(*) FROM files").fetchone()[0]
        assert proc.poll() is None, "the scan finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 100 <= landed < 400
    with Store.open(db) as store:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        partial = store.db.execute("SELECT count(*) FROM files").fetchone()[0]
        assert partial % 50 == 0  # whole batches only: no half-written batch
        report = scan(store, jobs=1)
        assert report.new == 400 - partial and report.unchanged == partial
        paths = [r[0] for r in store.db.execute("SELECT path FROM files")]
        assert len(paths) == len(set(paths)) == 400
