"""Benchmark of `mergekit-sd merge`: peak memory and wall time of real-size merges.

Targets (from the issue), each measured against baselines in the same run:
  1. SD1.5 weighted_sum (alpha 0.5) of two full-size fp16 checkpoints (2.13 GB each), fp16 out:
     a. peak RSS <= 600 MB
     b. wall time <= 0.8x the naive way (safetensors.torch.load_file x2, torch.lerp per key in
        fp32, save_file, fsync), run in a child process of its own on the same files
     c. (aim) wall time <= 2x the I/O floor: `cat A B >/dev/null && cp A OUT && sync OUT`
     Also measured, for information: sd-mecha 1.1.8 on the same merge through its public API
     (sd_mecha.model, sd_mecha.weighted_sum, sd_mecha.merge(output=..., output_dtype=fp16)),
     installed apart from the venv so it cannot touch its torch (see --mecha-site).
  2. SDXL add_difference of three full-size fp16 checkpoints (6.88 GB each): peak RSS <= 1 GB.
  3. Peak RSS does not grow with model size: weighted_sum of FLUX.1-dev transformers (bf16) cut
     to 1/8, 1/4 and 1/2 of their blocks (2.9, 6.4, 12.3 GB): largest / smallest peak <= 1.25.

Our side is the command line as users run it, `mergekit-sd merge RECIPE`, in a child process;
its time includes the SHA256 of every input the merge records for provenance (a separate
in-process run with cProfile shows how long hashing, merging and the final fsync take). Every
contender runs in a child of its own and its peak RSS is that child's ru_maxrss (wait4); all
write and fsync their output. Cache state: before every measured run the page cache is dropped
(`sync; echo 3 > /proc/sys/vm/drop_caches`) when this process may, else every input is read once
(warm cache for all alike); the output says which. Contenders run interleaved, in a rotating
order, and times are medians.

Run from the repository root: .venv/bin/python bench/merge.py  (about 7 minutes on 2 cores;
needs about 40 GB free in --workdir, default /tmp; the model files are random fp16/bf16 values,
generated once per run and deleted at the end). --quick: one round, SDXL UNet only, FLUX at
1/32, 1/16 and 1/8. Prints tables and PASS/FAIL lines, writes bench/results/merge.json, and
exits 0 whatever the outcome.

sd-mecha is optional: install it apart, without its dependencies (which would pull a torch):
  .venv/bin/python bench/merge.py --install-mecha      (or by hand, see MECHA_PACKAGES)
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/inspect.py would shadow the standard library's `inspect` (torch imports it) if this
# folder stayed first on the path: move it to the end, and put the repository root first.
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

# The parent stays small on purpose (no torch, no engine): Linux carries a parent's RSS
# high-water mark into its children across fork+exec, and children are what we measure.

TARGET_SD1_PEAK = 600_000_000
TARGET_SD1_VS_NAIVE = 0.8
AIM_SD1_VS_FLOOR = 2.0
TARGET_SDXL_PEAK = 1_000_000_000
TARGET_FLUX_FLATNESS = 1.25

MECHA_SITE = Path("/tmp/mecha-site")
# sd-mecha and the dependencies the venv lacks, every one installed with --no-deps (its own
# requirement list names torch, which must not be reinstalled).
MECHA_PACKAGES = ("sd-mecha==1.1.8", "scipy==1.17.1", "fuzzywuzzy==0.18.0",
                  "python-Levenshtein==0.27.5", "Levenshtein==0.27.5", "rapidfuzz==3.14.6")
MARGIN = 2 * m.GB  # free space kept beyond what a case writes

THIS = str(Path(__file__).resolve())
CLI = str(m.REPO / ".venv" / "bin" / "mergekit-sd")


# --- children ------------------------------------------------------------------------------------


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def child_sizes(spec: str) -> None:
    """Bytes of each synthetic file a case needs: [[variant, dtype, fraction], ...] -> sizes."""
    from mergekit_sd.testing.checkpoints import checkpoint_specs

    out = []
    for variant, dtype, fraction in json.loads(spec):
        specs = checkpoint_specs(variant, "full", dtype, fraction)
        out.append({"bytes": sum(s.nbytes for s in specs), "tensors": len(specs),
                    "largest": max(s.nbytes for s in specs)})
    print(json.dumps({"sizes": out}))


def child_generate(path: str, variant: str, dtype: str, seed: int, fraction: float | None
                   ) -> None:
    from mergekit_sd.testing.checkpoints import write_checkpoint

    start = time.perf_counter()
    write_checkpoint(path, variant, size="full", fill="random", dtype=dtype, seed=seed,
                     blocks_fraction=fraction)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "bytes": os.path.getsize(path)}))


def child_imports() -> None:
    """What our merge process holds before any tensor: python, torch, the engine, the CLI."""
    import rich.progress  # noqa: F401
    import torch  # noqa: F401

    import mergekit_sd.cli  # noqa: F401
    import mergekit_sd.merge.executor  # noqa: F401
    import mergekit_sd.merge.methods.basic  # noqa: F401

    print(json.dumps({}))


def child_naive(a: str, b: str, out: str, alpha: float) -> None:
    """The naive way: both models in memory, lerp each key in fp32, save_file, fsync."""
    import torch
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    first, second = load_file(a), load_file(b)
    loaded = time.perf_counter()
    merged = {}
    for key, x in first.items():
        y = second.get(key)
        if y is not None and x.is_floating_point() and y.shape == x.shape:
            merged[key] = torch.lerp(x.float(), y.float(), alpha).to(x.dtype)
        else:
            merged[key] = x
    computed = time.perf_counter()
    save_file(merged, out)
    saved = time.perf_counter()
    _fsync(out)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "merge_s": computed - loaded,
                      "save_s": saved - computed, "fsync_s": done - saved,
                      "total_s": done - start}))


def child_mecha(site: str, a: str, b: str, out: str, alpha: float) -> None:
    """sd-mecha's own public API for the same weighted sum, fp16 output."""
    os.environ["TQDM_DISABLE"] = "1"  # no progress bar in the captured output
    sys.path.insert(0, site)
    import importlib.metadata

    import sd_mecha
    import torch

    start = time.perf_counter()
    recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=alpha)
    sd_mecha.merge(recipe, output=out, merge_device="cpu", merge_dtype=torch.float32,
                   output_dtype=torch.float16)
    merged = time.perf_counter()
    _fsync(out)
    done = time.perf_counter()
    print(json.dumps({"merge_s": merged - start, "fsync_s": done - merged,
                      "total_s": done - start,
                      "sd_mecha": importlib.metadata.version("sd-mecha"),
                      "sd_mecha_file": sd_mecha.__file__, "torch": torch.__version__,
                      "torch_file": torch.__file__}))


def child_profile(recipe: str, top: int, known: str | None) -> None:
    """Our merge in-process, once: when each stage ran (first and last progress callback; stages
    may overlap, e.g. hashing runs beside merging), CPU time and page faults of the process, and
    cProfile's main-thread view (reads, writes and hashing run in worker threads, which cProfile
    does not see: the main thread's waits for them show as lock acquire). `known`: JSON of
    input name -> SHA256, given to the plan as a catalog would, so nothing is hashed."""
    import cProfile
    import pstats
    import resource

    import torch  # noqa: F401  imported before the clock, as the CLI has it by then

    from mergekit_sd.merge.executor import run_merge
    from mergekit_sd.merge.plan import build_plan
    from mergekit_sd.recipe.loader import load_recipe

    marks: dict[str, list[float]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        marks.setdefault(stage, [now, now])[1] = now

    start = time.perf_counter()
    plan = build_plan(load_recipe(Path(recipe)))
    for name, sha in json.loads(known or "{}").items():
        plan.inputs[name].known_sha256 = sha
    planned = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    profiler = cProfile.Profile()
    profiler.enable()
    run_merge(plan, progress=progress)
    profiler.disable()
    end = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF)
    stages = {stage: [first - planned, last - planned] for stage, (first, last) in marks.items()}
    last_mark = max((last for _, last in marks.values()), default=planned)
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():
        name = func if file == "~" else f"{Path(file).name}:{line}({func})"
        rows.append({"function": name, "calls": calls, "tottime": tottime, "cumtime": cumtime})
    rows.sort(key=lambda r: -r["tottime"])
    print(json.dumps({"plan_s": planned - start, "merge_s": end - planned, "stages": stages,
                      "after_last_progress_s": end - last_mark,
                      "user_s": after.ru_utime - before.ru_utime,
                      "sys_s": after.ru_stime - before.ru_stime,
                      "minor_faults": after.ru_minflt - before.ru_minflt,
                      "hashed": not known, "top": rows[:top]}))


def child_compare(reference: str, others: list[str]) -> None:
    """Largest absolute difference of each file's tensors from the reference's."""
    import torch
    from safetensors import safe_open

    result = {}
    with safe_open(reference, "pt") as ref:
        keys = list(ref.keys())
        for other in others:
            worst, differing, missing = 0.0, 0, 0
            with safe_open(other, "pt") as f:
                names = set(f.keys())
                for key in keys:
                    if key not in names:
                        missing += 1
                        continue
                    x, y = ref.get_tensor(key), f.get_tensor(key)
                    if x.shape != y.shape or x.dtype != y.dtype:
                        differing += 1
                        continue
                    if not torch.equal(x, y):
                        differing += 1
                        if x.is_floating_point():
                            worst = max(worst, (x.float() - y.float()).abs().max().item())
            result[other] = {"keys": len(keys), "differing": differing, "missing": missing,
                             "extra": len(names - set(keys)), "max_abs_diff": worst}
    print(json.dumps(result))


# --- the parent's tools --------------------------------------------------------------------------


def python_child(*args: str, timeout: float | None = None) -> m.ChildResult:
    done = m.run_child([sys.executable, THIS, "--child", *args], timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def sha256_of(path: Path) -> str:
    """The parent's own SHA256 of an input (hashlib, no torch), for the hashes-known run."""
    import hashlib

    digest = hashlib.sha256()
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class Cache:
    """Puts the page cache in the same state before every measured run."""

    def __init__(self, mode: str):
        self.mode = "cold" if mode == "auto" and can_drop_caches() else (
            "warm" if mode == "auto" else mode)

    def prepare(self, inputs: list[Path]) -> None:
        os.sync()  # the previous run's dirty pages are not written back during this one
        if self.mode == "cold":
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        else:
            for path in inputs:
                with open(path, "rb", buffering=0) as f:
                    while f.read(16 << 20):
                        pass

    def describe(self) -> str:
        if self.mode == "cold":
            return ("cold: sync and drop_caches before every measured run (each contender "
                    "reads its inputs from disk)")
        return ("warm: sync, then every input read once before every measured run (the page "
                "cache could not be dropped here); reads hit memory for every contender")


def generate(files: list[tuple[Path, str, str, int, float | None]]) -> float:
    """Write the synthetic inputs, as many at once as there are CPUs; returns seconds."""
    start = time.perf_counter()
    pending = list(files)
    running: list[tuple[subprocess.Popen, Path]] = []
    width = max(1, min(os.cpu_count() or 1, 4))
    while pending or running:
        while pending and len(running) < width:
            path, variant, dtype, seed, fraction = pending.pop(0)
            argv = [sys.executable, THIS, "--child", "generate", "--path", str(path),
                    "--variant", variant, "--dtype", dtype, "--seed", str(seed)]
            if fraction is not None:
                argv += ["--fraction", repr(fraction)]
            running.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, env=m.child_env(),
                                             cwd=m.REPO), path))
        proc, path = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"generating {path.name} failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - start


def sizes_of(cases: list[tuple[str, str, float | None]]) -> list[dict]:
    return python_child("sizes", "--spec", json.dumps(cases)).json_line()["sizes"]


def write_recipe(path: Path, models: dict[str, Path], method: str, alpha: float, dtype: str,
                 out: Path) -> Path:
    lines = ["version: 1", "models:"]
    lines += [f"  {name}: {json.dumps(str(p))}" for name, p in models.items()]
    lines += ["steps:", "  - name: merged", f"    method: {method}",
              f"    inputs: [{', '.join(models)}]", "    params:", f"      alpha: {alpha}",
              "output:", f"  path: {json.dumps(str(out))}", f"  dtype: {dtype}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_estimate(recipe: Path) -> dict:
    done = m.run_child([CLI, "plan", str(recipe), "--json"])
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    data = json.loads(done.stdout)
    return {"estimated_peak_bytes": data.get("estimated_peak_bytes"),
            "estimated_seconds": data.get("estimated_seconds")}


def run_ours(recipe: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    done = m.run_child([CLI, "merge", str(recipe)])
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"mergekit-sd merge exited {done.returncode}:\n{done.stderr[-3000:]}")
    return {"wall_s": done.wall_s, "peak_rss": done.peak_rss, "out_bytes": out.stat().st_size}


def free_ok(workdir: Path, needed: int) -> bool:
    return m.free_bytes(workdir) >= needed + MARGIN


def engine_version() -> str:
    """The commit measured, and whether the engine's sources differ from it."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=m.REPO)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "mergekit_sd")
    return commit + (" + uncommitted changes in mergekit_sd/" if dirty else "")


def loadavg() -> list[float]:
    return list(os.getloadavg())


def mecha_status(site: Path) -> str | None:
    """None when sd-mecha can be imported from `site` with the venv's torch, else why not."""
    if not (site / "sd_mecha").is_dir():
        return (f"sd-mecha is not installed in {site} (run with --install-mecha, or "
                f"`.venv/bin/pip install --no-deps --target {site} "
                f"{' '.join(MECHA_PACKAGES)}`)")
    probe = subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(site)!r}); import sd_mecha, "
                            "torch; print(torch.__file__)"],
                           capture_output=True, text=True, env=m.child_env(), cwd=m.REPO)
    if probe.returncode != 0:
        return "sd-mecha does not import: " + probe.stderr.strip().splitlines()[-1]
    if str(site) in probe.stdout:
        return f"{site} holds its own torch; refusing to measure with it"
    return None


def install_mecha(site: Path) -> None:
    argv = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site),
            *MECHA_PACKAGES]
    print("$ " + " ".join(argv))
    subprocess.run(argv, check=False)


# --- case 1: SD1.5 weighted sum ------------------------------------------------------------------


def case_sd1(root: Path, args, cache: Cache, results: dict) -> None:
    variant, dtype = "sd1", "F16"
    size = sizes_of([[variant, dtype, None]])[0]
    contenders = ["ours", "naive", "floor"]
    mecha_reason = mecha_status(args.mecha_site) if args.mecha_runs else "--mecha-runs 0"
    if mecha_reason is None:
        contenders.append("mecha")
    needed = size["bytes"] * (2 + len(contenders))
    if not free_ok(root, needed):
        print(f"SKIP  case 1: {m.human_bytes(m.free_bytes(root))} free, needs "
              f"{m.human_bytes(needed + MARGIN)}")
        results["sd1"] = {"verdict": "SKIP"}
        return
    a, b = root / "sd1-a.safetensors", root / "sd1-b.safetensors"
    gen_s = generate([(a, variant, dtype, 1, None), (b, variant, dtype, 2, None)])
    outs = {name: root / f"sd1-out-{name}.safetensors" for name in contenders}
    recipe = write_recipe(root / "sd1.yaml", {"a": a, "b": b}, "weighted_sum", 0.5, "fp16",
                          outs["ours"])
    estimate = plan_estimate(recipe)

    def run(name: str) -> dict:
        out = outs[name]
        out.unlink(missing_ok=True)
        cache.prepare([a, b])
        if name == "ours":
            return run_ours(recipe, out)
        if name == "naive":
            done = python_child("naive", "--inputs", str(a), str(b), "--path", str(out),
                                "--alpha", "0.5")
        elif name == "mecha":
            done = python_child("mecha", "--inputs", str(a), str(b), "--path", str(out),
                                "--alpha", "0.5", "--mecha-site", str(args.mecha_site))
        else:
            done = m.run_child(["sh", "-c", f'cat "{a}" "{b}" >/dev/null && cp "{a}" "{out}" '
                                f'&& sync "{out}"'])
            if done.returncode != 0:
                raise RuntimeError(f"floor command failed: {done.stderr[-2000:]}")
            return {"wall_s": done.wall_s, "peak_rss": done.peak_rss}
        return {"wall_s": done.wall_s, "peak_rss": done.peak_rss, **done.json_line()}

    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_ in range(args.runs):
        order = contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]
        for name in order:
            if name == "mecha" and len(runs["mecha"]) >= args.mecha_runs:
                continue
            runs[name].append({**run(name), "round": round_})
            print(f"  round {round_ + 1}/{args.runs}: {name:5s} {runs[name][-1]['wall_s']:6.1f} s"
                  f"  {m.human_bytes(runs[name][-1]['peak_rss'])}", flush=True)
        if round_ < args.runs - 1:
            outs["floor"].unlink(missing_ok=True)
    while "mecha" in runs and len(runs["mecha"]) < args.mecha_runs:
        runs["mecha"].append({**run("mecha"), "round": None})
    outs["floor"].unlink(missing_ok=True)

    # same bytes as the naive way? (ours and the naive way both lerp in fp32, then cast)
    compared = python_child("compare", "--path", str(outs["naive"]), "--inputs",
                            *(str(outs[n]) for n in ("ours", "mecha") if n in outs)).json_line()
    for name in ("naive", "mecha"):
        if name in outs:
            outs[name].unlink(missing_ok=True)
    hashes = {"a": sha256_of(a), "b": sha256_of(b)}
    outs["ours"].unlink(missing_ok=True)  # a merge does not replace a file unless told to
    cache.prepare([a, b])
    profile = python_child("profile", "--recipe", str(recipe), "--top", "12").json_line()
    outs["ours"].unlink(missing_ok=True)
    cache.prepare([a, b])
    known = python_child("profile", "--recipe", str(recipe), "--top", "12",
                         "--spec", json.dumps(hashes)).json_line()
    outs["ours"].unlink(missing_ok=True)
    a.unlink()
    b.unlink()

    wall = {n: m.median([r["wall_s"] for r in rs]) for n, rs in runs.items()}
    peak = {n: max(r["peak_rss"] for r in rs) for n, rs in runs.items()}
    labels = {"ours": "ours: mergekit-sd merge (SHA256 of inputs included)",
              "naive": "naive: load_file x2, lerp, save_file, fsync",
              "floor": "I/O floor: cat A B >/dev/null; cp A OUT; sync OUT",
              "mecha": "sd-mecha 1.1.8: merge(weighted_sum(model, model))"}
    print(f"\ncase 1: SD1.5 weighted_sum alpha 0.5 of two full-size {dtype} checkpoints "
          f"({size['tensors']} tensors, {m.human_bytes(size['bytes'])} each, largest tensor "
          f"{m.human_bytes(size['largest'])}), fp16 output")
    print(f"cache {cache.describe()}; runs: " + ", ".join(f"{n} {len(rs)}" for n, rs in
                                                           runs.items())
          + "; times are medians, peak RSS the highest of the runs")
    rows = []
    for name in contenders:
        rows.append([labels[name], f"{wall[name]:.2f}", f"{wall[name] / wall['naive']:.2f}",
                     f"{wall[name] / wall['floor']:.2f}", m.human_bytes(peak[name]),
                     f"{peak[name] / peak['naive']:.3f}" if name != "floor" else ""])
    imports = results["imports_peak_rss"]
    rows.append(["python + torch + mergekit_sd imports only", "", "", "",
                 m.human_bytes(imports), f"{imports / peak['naive']:.3f}"])
    m.print_table(["", "wall s", "vs naive", "vs floor", "peak RSS", "vs naive"], rows)
    print(f"ours above the imports: {m.human_bytes(peak['ours'] - imports)}")
    if mecha_reason:
        print(f"sd-mecha not run: {mecha_reason}")
    else:
        info = runs["mecha"][0]
        print(f"sd-mecha {info['sd_mecha']} imported from {Path(info['sd_mecha_file']).parents[1]}"
              f" with torch {info['torch']} from {Path(info['torch_file']).parents[1]}; "
              f"merge {info['merge_s']:.2f} s + fsync {info['fsync_s']:.2f} s")
        paired = [r["wall_s"] / n["wall_s"] for r in runs["mecha"] for n in runs["naive"]
                  if r["round"] is not None and r["round"] == n["round"]]
        if paired:
            print(f"sd-mecha vs the naive run of the same round (less exposed to drift than "
                  f"its {len(runs['mecha'])} run(s) against the medians): "
                  + ", ".join(f"{x:.2f}x" for x in paired))
    paired = {name: [r["wall_s"] / n["wall_s"] for r in runs[name] for n in runs["naive"]
                     if r["round"] == n["round"]] for name in ("ours", "floor")}
    print("ours / naive within each round: " + ", ".join(f"{x:.2f}" for x in paired["ours"])
          + f" (median {m.median(paired['ours']):.2f}); ours / floor within each round: "
          + ", ".join(f"{o['wall_s'] / f['wall_s']:.2f}" for o in runs["ours"]
                      for f in runs["floor"] if o["round"] == f["round"]))
    naive_phases = {k: m.median([r[k] for r in runs["naive"]])
                    for k in ("load_s", "merge_s", "save_s", "fsync_s")}
    print("naive phases (medians): " + ", ".join(f"{k[:-2]} {v:.2f} s"
                                                 for k, v in naive_phases.items()))
    for label, prof in (("ours in-process, inputs hashed (as the CLI does)", profile),
                        ("ours in-process, SHA256s known (as from the catalog)", known)):
        windows = ", ".join(f"{stage} {a:.2f}-{b:.2f} s" for stage, (a, b) in
                            prof["stages"].items())
        cpu = prof["user_s"] + prof["sys_s"]
        print(f"{label}: {prof['merge_s']:.2f} s (plan {prof['plan_s']:.2f} s before it); "
              f"{windows}; {prof['after_last_progress_s']:.2f} s after the last progress call "
              f"(hash wait, header, fsync, rename); CPU {prof['user_s']:.2f} user + "
              f"{prof['sys_s']:.2f} sys = {cpu / prof['merge_s']:.2f} of {os.cpu_count()} "
              f"cores; {prof['minor_faults']:,} minor page faults")
    saved = profile["merge_s"] - known["merge_s"]
    print(f"hashing the inputs costs {saved:.2f} s of {profile['merge_s']:.2f} s in-process "
          f"({saved / profile['merge_s']:.0%}; one run each, so noisy); ours without it would "
          f"be about {(wall['ours'] - saved) / wall['naive']:.2f}x the naive way and "
          f"{(wall['ours'] - saved) / wall['floor']:.2f}x the floor")
    print("main thread, top functions by own time (run with inputs hashed):")
    m.print_table(["function", "calls", "own s", "cum s"],
                  [[r["function"][:70], r["calls"], f"{r['tottime']:.2f}", f"{r['cumtime']:.2f}"]
                   for r in profile["top"][:8]])
    for path, diff in compared.items():
        who = "ours" if path == str(outs["ours"]) else "sd-mecha"
        print(f"{who} vs naive output: {diff['differing']} of {diff['keys']} tensors differ "
              f"(largest |difference| {diff['max_abs_diff']:.3g}), {diff['missing']} missing, "
              f"{diff['extra']} extra")
    if estimate.get("estimated_peak_bytes"):
        print(f"`mergekit-sd plan` estimated peak {m.human_bytes(estimate['estimated_peak_bytes'])}"
              f" and {estimate['estimated_seconds']:.1f} s")
    verdicts = {
        "peak_rss": m.verdict("1a SD1.5 merge peak RSS <= 600 MB", peak["ours"] <= TARGET_SD1_PEAK,
                              f"{m.human_bytes(peak['ours'])} ({peak['ours'] / peak['naive']:.2f}x"
                              f" the naive way's {m.human_bytes(peak['naive'])})"),
        "vs_naive": m.verdict("1b SD1.5 merge wall time <= 0.8x the naive way",
                              wall["ours"] / wall["naive"] <= TARGET_SD1_VS_NAIVE,
                              f"{wall['ours'] / wall['naive']:.2f}x ({wall['ours']:.2f} s vs "
                              f"{wall['naive']:.2f} s)"),
        "vs_floor": m.verdict("1c (aim) SD1.5 merge wall time <= 2x the I/O floor",
                              wall["ours"] / wall["floor"] <= AIM_SD1_VS_FLOOR,
                              f"{wall['ours'] / wall['floor']:.2f}x ({wall['ours']:.2f} s vs "
                              f"{wall['floor']:.2f} s)"),
    }
    results["sd1"] = {"verdicts": verdicts, "file_bytes": size["bytes"], "generate_s": gen_s,
                      "runs": runs, "median_wall_s": wall, "peak_rss": peak,
                      "ratio_wall_vs_naive": wall["ours"] / wall["naive"],
                      "ratio_wall_vs_naive_per_round": paired["ours"],
                      "ratio_wall_vs_floor": wall["ours"] / wall["floor"],
                      "ratio_peak_vs_naive": peak["ours"] / peak["naive"],
                      "naive_phases": naive_phases, "profile": profile,
                      "profile_hashes_known": known, "hashing_cost_s": saved,
                      "compare": compared,
                      "plan_estimate": estimate, "mecha_not_run": mecha_reason}


# --- case 2: SDXL add difference -----------------------------------------------------------------


def case_sdxl(root: Path, args, cache: Cache, results: dict) -> None:
    dtype = "F16"
    variant = "sdxl-unet" if args.quick else "sdxl"
    note = "--quick" if args.quick else None
    size = sizes_of([[variant, dtype, None]])[0]
    if not free_ok(root, 4 * size["bytes"]) and variant == "sdxl":
        note = (f"only {m.human_bytes(m.free_bytes(root))} free, the full checkpoint needs "
                f"{m.human_bytes(4 * size['bytes'] + MARGIN)}")
        variant = "sdxl-unet"
        size = sizes_of([[variant, dtype, None]])[0]
    if not free_ok(root, 4 * size["bytes"]):
        print(f"SKIP  case 2: {m.human_bytes(m.free_bytes(root))} free")
        results["sdxl"] = {"verdict": "SKIP"}
        return
    paths = {name: root / f"sdxl-{name}.safetensors" for name in ("a", "b", "c")}
    gen_s = generate([(p, variant, dtype, seed, None)
                      for seed, p in enumerate(paths.values(), start=1)])
    out = root / "sdxl-out.safetensors"
    recipe = write_recipe(root / "sdxl.yaml", paths, "add_difference", 0.8, "fp16", out)
    estimate = plan_estimate(recipe)
    runs = []
    for _ in range(args.sdxl_runs):
        cache.prepare(list(paths.values()))
        runs.append(run_ours(recipe, out))
        out.unlink()
    for p in paths.values():
        p.unlink()
    peak = max(r["peak_rss"] for r in runs)
    wall = m.median([r["wall_s"] for r in runs])
    print(f"\ncase 2: {variant} add_difference (A + 0.8 (B - C)) of three full-size {dtype} "
          f"files ({size['tensors']} tensors, {m.human_bytes(size['bytes'])} each, largest "
          f"tensor {m.human_bytes(size['largest'])}), fp16 output"
          + (f"; {variant} because {note}" if note else ""))
    m.print_table(["", "wall s", "GB/s in", "peak RSS", "vs target"], [
        ["ours: mergekit-sd merge", f"{wall:.2f}", f"{3 * size['bytes'] / wall / 1e9:.2f}",
         m.human_bytes(peak), f"{peak / TARGET_SDXL_PEAK:.2f}"]])
    print(f"ours above the imports: {m.human_bytes(peak - results['imports_peak_rss'])}")
    if estimate.get("estimated_peak_bytes"):
        print(f"`mergekit-sd plan` estimated peak {m.human_bytes(estimate['estimated_peak_bytes'])}"
              f" and {estimate['estimated_seconds']:.1f} s")
    word = m.verdict(f"2 {variant} add_difference peak RSS <= 1 GB", peak <= TARGET_SDXL_PEAK,
                     f"{m.human_bytes(peak)} for three {m.human_bytes(size['bytes'])} inputs")
    results["sdxl"] = {"verdict": word, "variant": variant, "note": note,
                       "file_bytes": size["bytes"], "largest_tensor": size["largest"],
                       "generate_s": gen_s, "runs": runs, "median_wall_s": wall,
                       "peak_rss": peak, "plan_estimate": estimate}


# --- case 3: FLUX at three sizes -----------------------------------------------------------------


def case_flux(root: Path, args, cache: Cache, results: dict) -> None:
    variant, dtype = "flux-dev-transformer", "BF16"
    if args.quick:
        fractions, note = [1 / 32, 1 / 16, 1 / 8], "--quick"
    elif args.flux_sizes == "issue":
        fractions, note = [1 / 8, 1 / 4, 1 / 2], None
    else:
        fractions = [1 / 16, 1 / 8, 1 / 4]
        note = ("the issue's 1/8, 1/4, 1/2 (2.9, 6.4, 12.3 GB) take about 90 s more to "
                "generate and merge (and 37 GB of disk), too long for this script's default; "
                "--flux-sizes issue measures them")
    sizes = sizes_of([[variant, dtype, f] for f in fractions])
    if not free_ok(root, 3 * sizes[-1]["bytes"]) and fractions[-1] == 1 / 2:
        note = (f"only {m.human_bytes(m.free_bytes(root))} free, 1/2 needs "
                f"{m.human_bytes(3 * sizes[-1]['bytes'] + MARGIN)}")
        fractions = [1 / 16, 1 / 8, 1 / 4]
        sizes = sizes_of([[variant, dtype, f] for f in fractions])
    if not free_ok(root, 3 * sizes[-1]["bytes"]):
        print(f"SKIP  case 3: {m.human_bytes(m.free_bytes(root))} free")
        results["flux"] = {"verdict": "SKIP"}
        return
    rows, per_size = [], []
    for fraction, size in zip(fractions, sizes, strict=True):
        a, b = root / "flux-a.safetensors", root / "flux-b.safetensors"
        gen_s = generate([(a, variant, dtype, 1, fraction), (b, variant, dtype, 2, fraction)])
        out = root / "flux-out.safetensors"
        recipe = write_recipe(root / "flux.yaml", {"a": a, "b": b}, "weighted_sum", 0.5, "bf16",
                              out)
        estimate = plan_estimate(recipe)
        cache.prepare([a, b])
        run = run_ours(recipe, out)
        for p in (a, b, out):
            p.unlink()
        per_size.append({"fraction": fraction, "file_bytes": size["bytes"],
                         "tensors": size["tensors"], "largest_tensor": size["largest"],
                         "generate_s": gen_s, **run, "plan_estimate": estimate})
        print(f"  FLUX 1/{round(1 / fraction)}: {run['wall_s']:.1f} s, "
              f"{m.human_bytes(run['peak_rss'])}", flush=True)
    smallest = per_size[0]["peak_rss"]
    for r in per_size:
        rows.append([f"1/{round(1 / r['fraction'])} of the blocks", r["tensors"],
                     m.human_bytes(r["file_bytes"]), f"{r['wall_s']:.2f}",
                     m.human_bytes(r["peak_rss"]), f"{r['peak_rss'] / smallest:.3f}",
                     m.human_bytes(r["plan_estimate"].get("estimated_peak_bytes") or 0)])
    print(f"\ncase 3: weighted_sum alpha 0.5 of two {variant} files in {dtype} (largest tensor "
          f"{m.human_bytes(sizes[0]['largest'])} at every size), bf16 output"
          + (f"\nsizes {', '.join(f'1/{round(1 / f)}' for f in fractions)}: {note}"
             if note else ""))
    m.print_table(["", "tensors", "each input", "wall s", "peak RSS", "vs smallest",
                   "plan's estimate"], rows)
    ratio = per_size[-1]["peak_rss"] / smallest
    word = m.verdict("3 peak RSS flat in model size (largest / smallest <= 1.25)",
                     ratio <= TARGET_FLUX_FLATNESS,
                     f"{ratio:.3f} ({m.human_bytes(per_size[-1]['peak_rss'])} at "
                     f"{m.human_bytes(per_size[-1]['file_bytes'])} vs "
                     f"{m.human_bytes(smallest)} at {m.human_bytes(per_size[0]['file_bytes'])})")
    results["flux"] = {"verdict": word, "note": note, "sizes": per_size, "ratio": ratio}


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the model files go (default: /tmp)")
    parser.add_argument("--runs", type=int, default=3,
                        help="case 1: rounds of ours, naive and floor, interleaved")
    parser.add_argument("--mecha-runs", type=int, default=1,
                        help="case 1: sd-mecha runs (0: leave it out; it is the slowest)")
    parser.add_argument("--sdxl-runs", type=int, default=1)
    parser.add_argument("--mecha-site", type=Path, default=MECHA_SITE,
                        help="folder sd-mecha is installed in (pip --target)")
    parser.add_argument("--install-mecha", action="store_true",
                        help="install sd-mecha 1.1.8 into --mecha-site first (--no-deps)")
    parser.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto")
    parser.add_argument("--only", default="sd1,sdxl,flux",
                        help="comma-separated cases to run: sd1, sdxl, flux")
    parser.add_argument("--flux-sizes", choices=("small", "issue"), default="small",
                        help="case 3: FLUX at 1/16, 1/8, 1/4 of the blocks (default) or the "
                        "issue's 1/8, 1/4, 1/2 (about 90 s more, 37 GB of disk)")
    parser.add_argument("--quick", action="store_true",
                        help="one round, SDXL UNet only, FLUX at 1/32, 1/16, 1/8")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--path", "--variant", "--dtype", "--recipe", "--spec"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--alpha", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--top", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "sizes":
            child_sizes(args.spec)
        elif args.child == "generate":
            child_generate(args.path, args.variant, args.dtype, args.seed, args.fraction)
        elif args.child == "imports":
            child_imports()
        elif args.child == "naive":
            child_naive(*args.inputs, args.path, args.alpha)
        elif args.child == "mecha":
            child_mecha(str(args.mecha_site), *args.inputs, args.path, args.alpha)
        elif args.child == "profile":
            child_profile(args.recipe, args.top, args.spec)
        elif args.child == "compare":
            child_compare(args.path, args.inputs)
        return

    if args.quick:
        args.runs = 1
    if args.install_mecha:
        install_mecha(args.mecha_site)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    workdir = args.workdir or Path(tempfile.gettempdir())
    cache = Cache(args.cache)
    started = time.perf_counter()
    imports = python_child("imports").peak_rss
    engine = engine_version()
    results: dict = {"imports_peak_rss": imports}
    run_info = {"cache": cache.mode, "quick": args.quick, "engine": engine,
                "loadavg_start": loadavg(), "parent_peak_rss": m.peak_rss_self(),
                "imports_peak_rss": imports, "cases": cases}
    print(f"page cache: {cache.describe()}; {os.cpu_count()} CPUs, load average "
          f"{run_info['loadavg_start'][0]:.2f}; {m.human_bytes(m.free_bytes(workdir))} free in "
          f"{workdir}; engine at {engine}")
    print(f"python + torch + mergekit_sd (CLI, engine) imported, no tensor: peak RSS "
          f"{m.human_bytes(imports)}")
    done: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mergekit-sd-bench-merge-", dir=workdir) as tmp:
        root = Path(tmp)
        steps = {"sd1": case_sd1, "sdxl": case_sdxl, "flux": case_flux}
        for name in cases:
            case_start = time.perf_counter()
            try:
                steps[name](root, args, cache, results)
            except Exception as exc:  # a case that cannot run is reported, not hidden
                print(f"ERROR case {name}: {exc}")
                results[name] = {"verdict": "ERROR", "error": str(exc)}
            key = ("flux_issue_sizes" if name == "flux" and args.flux_sizes == "issue"
                   else name) + ("_quick" if args.quick else "")
            done[key] = {**results.get(name, {}), "case_s": time.perf_counter() - case_start,
                         "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                         "cache": cache.mode, "engine": engine, "imports_peak_rss": imports}
            for leftover in root.iterdir():  # never keep GBs around between cases
                if leftover.is_file():
                    leftover.unlink()
                else:
                    shutil.rmtree(leftover, ignore_errors=True)
    elapsed = time.perf_counter() - started
    run_info.update(elapsed_s=elapsed, loadavg_end=loadavg())
    # each case keeps its latest run: a partial run (--only, --flux-sizes issue) updates its
    # cases and leaves the others' figures in place
    previous_cases = {}
    previous = m.RESULTS_DIR / "merge.json"
    if previous.exists():
        try:
            previous_cases = json.loads(previous.read_text()).get("cases", {})
        except (ValueError, AttributeError):
            previous_cases = {}
    out = m.write_results("merge", {"last_run": run_info, "cases": {**previous_cases, **done}})
    print(f"\nresults in {out.relative_to(m.REPO)} ({elapsed:.0f} s in all; load average at the "
          f"end {run_info['loadavg_end'][0]:.2f})")


if __name__ == "__main__":
    main()
