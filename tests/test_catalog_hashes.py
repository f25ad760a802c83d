"""One-pass hashing: every hash equals one computed independently, for every size class."""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import pytest

from catalog import hashes
from catalog.hashes import hash_file
from mergekit_sd.errors import Cancelled


def _safetensors(metadata_bytes: int, data: bytes) -> bytes:
    """A valid safetensors file: one U8 tensor holding `data`, metadata padding the header."""
    header = {"__metadata__": {"pad": "x" * metadata_bytes},
              "t": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _expected(blob: bytes, safetensors: bool) -> dict:
    autov1 = (hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
              if len(blob) >= 2 * 1024 * 1024 else None)
    autov3 = None
    if safetensors:
        start = 8 + int.from_bytes(blob[:8], "little")
        autov3 = hashlib.sha256(blob[start:]).hexdigest()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "crc32": f"{zlib.crc32(blob):08x}",
            "autov1": autov1, "autov3": autov3}


SIZES = {
    "empty": 0,
    "tiny": 100,
    "under-1MiB": 700_000,
    "between-1-and-2-MiB": 1_500_000,  # AutoV1 would read a full window, but is not defined
    "exactly-2MiB": 2 * 1024 * 1024,
    "over-a-chunk": 9 * 1024 * 1024 + 7,
}


@pytest.mark.parametrize("chunk", [hashes.CHUNK, 64 * 1024 + 3], ids=["8MiB", "odd-64KiB"])
@pytest.mark.parametrize("name", list(SIZES))
def test_plain_files_of_every_size_class(tmp_path, monkeypatch, name, chunk):
    monkeypatch.setattr(hashes, "CHUNK", chunk)  # odd chunks cut the AutoV1 window in pieces
    blob = os.urandom(SIZES[name])
    path = tmp_path / "model.bin"
    path.write_bytes(blob)
    got = hash_file(path)
    want = _expected(blob, safetensors=False)
    assert (got.sha256, got.crc32, got.autov1, got.autov3) == (
        want["sha256"], want["crc32"], want["autov1"], None)
    assert got.autov2 == want["sha256"][:10]


@pytest.mark.parametrize("chunk", [hashes.CHUNK, 64 * 1024 + 3], ids=["8MiB", "odd-64KiB"])
@pytest.mark.parametrize("header_bytes,data_bytes", [
    (100, 1000),  # a small file: no AutoV1
    (1_200_000, 3 * 1024 * 1024),  # a header over 1 MB, spanning chunks; AutoV1 in the header
    (50, 10 * 1024 * 1024 + 5),
], ids=["small", "header-over-1MB", "large"])
def test_safetensors_files(tmp_path, monkeypatch, chunk, header_bytes, data_bytes):
    monkeypatch.setattr(hashes, "CHUNK", chunk)
    blob = _safetensors(header_bytes, os.urandom(data_bytes))
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    got = hash_file(path)
    want = _expected(blob, safetensors=True)
    assert (got.sha256, got.crc32, got.autov1, got.autov3) == (
        want["sha256"], want["crc32"], want["autov1"], want["autov3"])
    assert got.autov3_short == want["autov3"][:12]
    if header_bytes > 1_000_000:
        assert 8 + int.from_bytes(blob[:8], "little") > 1_000_000


def test_autov3_ignores_metadata_edits(tmp_path):
    data = os.urandom(5000)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(_safetensors(10, data))
    b.write_bytes(_safetensors(99, data))
    ha, hb = hash_file(a), hash_file(b)
    assert ha.sha256 != hb.sha256
    assert ha.autov3 == hb.autov3 == hashlib.sha256(data).hexdigest()


def test_progress_and_cancel(tmp_path, monkeypatch):
    monkeypatch.setattr(hashes, "CHUNK", 1 << 16)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1 << 20))
    seen = []
    hash_file(path, on_bytes=seen.append)
    assert sum(seen) == 1 << 20 and len(seen) == 16
    calls = []
    with pytest.raises(Cancelled):
        hash_file(path, on_bytes=calls.append, cancelled=lambda: len(calls) >= 3)
    assert len(calls) == 3
