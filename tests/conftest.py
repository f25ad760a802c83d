"""Shared test helpers: run the real CLI in a subprocess, build raw safetensors bytes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `mergekit-sd ARGS` as a user would, in a fresh process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mergekit_sd.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


def run_piped(*args) -> subprocess.CompletedProcess:
    """run_cli into a pipe with no COLUMNS and no terminal on any stream (rich alone would lay
    the output out for 80 columns)."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "mergekit_sd.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


def raw_safetensors(entries: dict, data: bytes = b"", metadata: dict | None = None,
                    header_len: int | None = None) -> bytes:
    """Bytes of a safetensors file with the given header entries, unchecked (for bad files)."""
    doc = dict(entries)
    if metadata is not None:
        doc["__metadata__"] = metadata
    header = json.dumps(doc).encode()
    length = len(header) if header_len is None else header_len
    return struct.pack("<Q", length) + header + data


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory):
    """Key maps and file hashes are cached per user; the suite keeps its own (shared by the
    CLI subprocesses it starts), never the user's."""
    os.environ["MERGEKIT_SD_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
