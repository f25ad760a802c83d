"""The header reader refuses every kind of bad file with one sentence, and the CLI exits 2."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import orjson
import pytest
import torch
from conftest import raw_safetensors, run_cli
from safetensors.torch import save_file

from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.header import read_header

GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]}}


class RunsACommand:
    """A pickle payload that would run a shell command if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def bad_files(tmp_path):
    """name -> (path, words the one-sentence error must contain)."""
    files = {}

    def put(name, content, *words):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        files[name] = (path, words)

    put("empty", b"", "empty")
    put("tiny", b"\x01\x02", "too short")
    put("truncated", raw_safetensors(GOOD, b"\0" * 12), "truncated", "8 missing")
    put("header-longer-than-file", raw_safetensors(GOOD, b"\0" * 20, header_len=10_000),
        "header", "only")
    put("bad-json", struct.pack("<Q", 5) + b'{"a":', "not valid JSON")
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    put("deep-json", struct.pack("<Q", len(deep)) + deep, "header", "corrupt")
    put("unknown-dtype", raw_safetensors(
        {"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        "unknown dtype")
    put("overlap", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps")
    put("out-of-range", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [8_000_000, 8_000_008]}},
        b"\0" * 16), "offsets")
    put("shape-bytes-mismatch", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 12 bytes", "the file is corrupt; download it again")
    put("trailing-bytes", raw_safetensors(GOOD, b"\0" * 24), "unexpected bytes")
    put("pickle", pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "pickle")
    put("gguf", b"GGUF" + struct.pack("<I", 3) + bytes(64), "GGUF file")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("model/readme.txt", "a model's card")
    put("zip", archive.getvalue(), "zip archive", "unpack it")
    torch_path = tmp_path / "torch-zip.safetensors"
    torch.save({"w": torch.ones(2)}, torch_path)
    files["torch-zip"] = (torch_path, ("pickle",))
    marker = tmp_path / "PWNED"
    put("malicious-pickle", pickle.dumps(RunsACommand(marker), protocol=2), "pickle")
    directory = tmp_path / "folder.safetensors"
    directory.mkdir()
    files["directory"] = (directory, ("directory",))
    return files, marker


@pytest.mark.parametrize("name", [
    "empty", "tiny", "truncated", "header-longer-than-file", "bad-json", "deep-json",
    "unknown-dtype",
    "overlap", "out-of-range", "shape-bytes-mismatch", "trailing-bytes", "pickle", "gguf", "zip",
    "torch-zip",
    "malicious-pickle", "directory"])
@pytest.mark.parametrize("loads", [json.loads, orjson.loads], ids=["json", "orjson"])
def test_bad_file_raises_one_sentence(tmp_path, name, loads):
    files, marker = bad_files(tmp_path)
    path, words = files[name]
    with pytest.raises(BadModelFile) as caught:
        read_header(path, loads=loads)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message, message
    assert not marker.exists()


def test_cli_gives_exit_2_and_one_line_per_bad_file(tmp_path):
    files, marker = bad_files(tmp_path)
    result = run_cli("inspect", *(path for path, _ in files.values()))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(files)
    assert all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists(), "unpickling ran the payload's command"


def test_good_file_written_by_the_reference_library(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(4, dtype=torch.bfloat16)}, path,
              metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    assert header.tensors["a"].shape == (3, 2) and header.tensors["a"].dtype == "F32"
    assert header.tensors["b"].nbytes == 8
    assert header.data_start + sum(t.nbytes for t in header.tensors.values()) == header.file_size


def test_fp8_and_bf16_dtypes_are_known(tmp_path):
    path = tmp_path / "f8.safetensors"
    save_file({"a": torch.zeros(4).to(torch.float8_e4m3fn),
               "b": torch.zeros(4).to(torch.float8_e5m2)}, path)
    assert {t.dtype for t in read_header(path).tensors.values()} == {"F8_E4M3", "F8_E5M2"}


def test_missing_file_is_one_sentence(tmp_path):
    result = run_cli("inspect", tmp_path / "nope.safetensors")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: does not exist"


def test_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    # a header of 0x280 bytes makes the file start with 80 02, the pickle PROTO 2 opcode
    path = tmp_path / "lookalike.safetensors"
    pad = 0x280 - len('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    body = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + " " * pad
    path.write_bytes(struct.pack("<Q", len(body)) + body.encode() + b"\0" * 4)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_header(path).tensors["w"].shape == (1,)


def test_a_text_file_is_said_to_be_text_not_a_huge_header(tmp_path):
    """Text read as a header length is a number of 19 digits: never shown as a length, never
    called truncated (the catalog calls a file that only when its length is plausible)."""
    from catalog.identity import examine

    recipe = tmp_path / "demo.yaml"
    recipe.write_text("models:\n  a: a.safetensors\nsteps: []\n")
    page = tmp_path / "download.safetensors"
    page.write_text("<!DOCTYPE html><html><body>Rate limited – try later</body></html>\n")
    with pytest.raises(BadModelFile) as caught:
        read_header(recipe)
    assert str(caught.value) == (
        f"{recipe}: is not a safetensors file (it is text); a YAML recipe is run with "
        f"`mergekit-sd plan {recipe}` and `mergekit-sd merge {recipe}`")
    with pytest.raises(BadModelFile) as caught:
        read_header(page)
    assert str(caught.value) == f"{page}: is not a safetensors file (it is text)"
    assert (examine(str(page)).status, examine(str(page)).problem) == (
        "invalid", "is not a safetensors file (it is text)")


def test_a_length_over_the_limit_is_no_safetensors_file_and_no_truncated_one(tmp_path):
    from catalog.identity import examine

    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"\0\1" * 20)
    with pytest.raises(BadModelFile) as caught:
        read_header(path)
    assert str(caught.value) == (
        f"{path}: is not a safetensors file (its first 8 bytes give a 1000000000-byte header, "
        "over the format's 100 MB limit)")
    assert examine(str(path)).status == "invalid"
    # a plausible length the file cannot hold, its JSON begun: a download cut in its header
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw_safetensors(GOOD, b"\0" * 20, header_len=10_000))
    assert examine(str(cut)).status == "truncated"
