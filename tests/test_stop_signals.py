"""SIGTERM/SIGHUP while an output is written: the command ends as an interrupted one does (its
exit code, no partial file), in a real `mergekit-sd` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

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

def write_recipe(tmp_path: Path, models: dict[str, Path]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out.safetensors", **models))
    return path


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
