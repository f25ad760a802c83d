"""Ctrl-C while torch loads, and SIGTERM/SIGHUP while an output is written: the command ends
as an interrupted one does (its exit code, no partial file), in a real `mergekit-sd` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from mergekit_sd.testing import write_checkpoint

RECIPE = """version: 1
models:
  a: {a}
  b: {b}
steps:
  - {{name: m, method: weighted_sum, inputs: [a, b], params: {{alpha: 0.5}}}}
output:
  path: {out}
"""

# Run in a fresh process: Ctrl-C arrives from inside torch's import (the first of its
# submodules being looked up), deterministically where a user's Ctrl-C may land by chance.
CTRL_C_INSIDE_TORCH = """
import importlib.abc, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal starts us


class CtrlCInsideTorch(importlib.abc.MetaPathFinder):
    sent = False

    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch.") and not self.sent:
            CtrlCInsideTorch.sent = True
            signal.raise_signal(signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlCInsideTorch())
from mergekit_sd.cli import main

sys.argv = ["mergekit-sd", *sys.argv[1:]]
try:
    main()
finally:
    torch = sys.modules.get("torch")
    print("sent" if CtrlCInsideTorch.sent else "not sent",
          "torch whole" if hasattr(torch, "zeros") else "torch cut")
"""


def write_recipe(tmp_path: Path, models: dict[str, Path]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out.safetensors", **models))
    return path


def pickle_root(tmp_path: Path) -> tuple[Path, Path]:
    """A catalog with one root holding a zip pickle (.ckpt), which only torch reads."""
    import torch
    from safetensors.torch import load_file

    root = tmp_path / "models"
    root.mkdir()
    ckpt = root / "old.ckpt"
    torch.save({"state_dict": load_file(write_checkpoint(tmp_path / "c.safetensors", "sd1"))},
               ckpt)
    catalog = tmp_path / "c.sqlite"
    added = run_cli("catalog", "add-root", root, "--catalog", catalog)
    assert added.returncode == 0, added.stderr
    return ckpt, catalog


@pytest.mark.parametrize("command", ["merge", "plan", "convert", "catalog scan", "inspect"])
def test_ctrl_c_while_torch_loads_ends_the_command_as_interrupted(tmp_path, command):
    """A KeyboardInterrupt raised inside torch's C++ start-up is swallowed (the command runs
    to the end, exit 0), half-imports numpy or aborts: the import must finish first. A scan
    and `inspect` import torch only when they meet a pickle (.ckpt), and then held too."""
    models = {n: write_checkpoint(tmp_path / f"{n}.safetensors", "sd1") for n in "ab"}
    if command in ("catalog scan", "inspect"):
        ckpt, catalog = pickle_root(tmp_path)
        args = ["catalog", "scan", "--catalog", catalog] if command == "catalog scan" else \
            ["inspect", ckpt]
    else:
        args = {"merge": ["merge", write_recipe(tmp_path, models)],
                "plan": ["plan", write_recipe(tmp_path, models)],
                "convert": ["convert", models["a"], tmp_path / "out.safetensors", "--dtype",
                            "fp16"]}[command]
    done = subprocess.run([sys.executable, "-c", CTRL_C_INSIDE_TORCH, *map(str, args)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stdout.split("\n")[-2] == "sent torch whole", done.stdout + done.stderr
    assert done.stderr.startswith("interrupted: "), done.stderr
    assert not list(tmp_path.glob("out*"))


def test_a_scan_of_safetensors_files_does_not_import_torch(tmp_path):
    """torch is imported for pickles only: a scan of safetensors files reads headers."""
    root = tmp_path / "models"
    for name in "ab":
        write_checkpoint(root / f"{name}.safetensors", "sd1")
    catalog = tmp_path / "c.sqlite"
    assert run_cli("catalog", "add-root", root, "--catalog", catalog).returncode == 0
    script = ("import sys\nfrom mergekit_sd.cli import main\n"
              f"sys.argv = ['mergekit-sd', 'catalog', 'scan', '--hash', '--catalog', "
              f"{str(catalog)!r}]\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.stdout.splitlines()[-2:] == ["exit 0", "False"], done.stdout + done.stderr
    assert "2 new" in done.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_while_writing_leave_no_partial_file(tmp_path, signum):
    """`kill`, `timeout` and a closed terminal clean up as Ctrl-C does."""
    models = {n: write_checkpoint(tmp_path / f"{n}.safetensors", "sd1", size="full",
                                  dtype="F16", fill="sparse") for n in "ab"}
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_sd.cli", "merge",
                             str(write_recipe(tmp_path, models))],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "out.safetensors.partial"
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert partial.exists(), "the merge should be writing"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.endswith(f"interrupted by {name}: no file was left half-written under its "
                           "final name\n"), stderr
    assert not partial.exists() and not (tmp_path / "out.safetensors").exists()
