"""The streaming writer: bit-exact round trips, any write order, atomic commit, no half files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from mergekit_sd.errors import UserError
from mergekit_sd.io.dtypes import safetensors_dtype
from mergekit_sd.io.header import read_header
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
from mergekit_sd.testing import write_checkpoint


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "f16": torch.randn(3, 3, 3, generator=g).half(),
        "bf16": torch.randn(11, generator=g).bfloat16(),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "i64": torch.arange(77).reshape(1, 77),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
    }


def specs_for(tensors):
    return [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_round_trip_is_bit_exact_in_any_write_order(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "out.safetensors"
    with StreamingWriter(path, specs_for(tensors), {"title": "x"}) as writer:
        for name in sorted(tensors, reverse=True):  # not the declared order
            writer.write(name, tensors[name])
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert as_bytes(loaded[name]) == as_bytes(tensor), name
    assert read_header(path).metadata == {"title": "x"}
    with SafetensorsReader(path) as reader:
        assert as_bytes(reader.read_tensor("bf16")) == as_bytes(tensors["bf16"])
    assert not (tmp_path / "out.safetensors.partial").exists()


def test_data_is_8_byte_aligned(tmp_path):
    path = tmp_path / "a.safetensors"
    with StreamingWriter(path, [TensorSpec("x", "F32", (3,))]) as writer:
        writer.write("x", torch.ones(3))
    assert read_header(path).data_start % 8 == 0


def test_missing_tensor_means_no_file(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = sample_tensors()
    with pytest.raises(RuntimeError, match="never written"), \
            StreamingWriter(path, specs_for(tensors)) as writer:
        writer.write("f32", tensors["f32"])
    assert not path.exists() and not (tmp_path / "out.safetensors.partial").exists()


def test_wrong_shape_or_dtype_is_refused(tmp_path):
    with StreamingWriter(tmp_path / "o.safetensors", [TensorSpec("x", "F16", (2,))]) as writer:
        with pytest.raises(ValueError):
            writer.write("x", torch.ones(2))  # float32, declared F16
        with pytest.raises(ValueError):
            writer.write("x", torch.ones(3).half())
        writer.write("x", torch.ones(2).half())
        with pytest.raises(ValueError, match="already written"):
            writer.write("x", torch.ones(2).half())


def test_exception_mid_write_removes_the_partial_file(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous version")
    with pytest.raises(KeyboardInterrupt), \
            StreamingWriter(path, [TensorSpec("x", "F32", (4,))]) as writer:
        assert writer.partial.exists()
        raise KeyboardInterrupt
    assert path.read_bytes() == b"previous version"
    assert not writer.partial.exists()


KILLED_WRITER = """
import sys, time, torch
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
specs = [TensorSpec(f"t{i}", "F32", (256, 256)) for i in range(64)]
with StreamingWriter(sys.argv[1], specs) as writer:
    for i, spec in enumerate(specs):
        writer.write(spec.name, torch.full((256, 256), float(i)))
        if i == 31:
            print("half", flush=True)
            time.sleep(60)
"""


def test_killed_write_leaves_nothing_under_the_final_name(tmp_path):
    path = tmp_path / "out.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "half"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.05)
    assert not path.exists()
    assert (tmp_path / "out.safetensors.partial").exists()


def test_a_tensor_can_arrive_in_pieces(tmp_path):
    path = tmp_path / "parts.safetensors"
    values = torch.arange(1000, dtype=torch.float32)
    raw = values.numpy().tobytes()
    with StreamingWriter(path, [TensorSpec("x", "F32", (1000,))]) as writer:
        writer.write_part("x", 2000, raw[2000:])
        assert writer.missing == {"x"}
        writer.write_part("x", 0, raw[:2000])
        assert not writer.missing
        with pytest.raises(ValueError):
            writer.write_part("x", 0, raw[:4])
    assert torch.equal(load_file(path)["x"], values)


def test_a_piece_outside_the_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside"), \
            StreamingWriter(tmp_path / "o.safetensors", [TensorSpec("x", "F32", (2,))]) as w:
        w.write_part("x", 4, b"\0" * 8)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_run_of_parts_is_written_from_one_buffer_when_they_follow_each_other(tmp_path):
    path = tmp_path / "run.safetensors"
    a, b = torch.arange(10, dtype=torch.float32), torch.arange(6, dtype=torch.float16)
    specs = [TensorSpec("a", "F32", (10,)), TensorSpec("b", "F16", (6,))]
    raw = a.numpy().tobytes() + b.numpy().tobytes()
    with StreamingWriter(path, specs) as writer:
        assert writer.file_offset("b", 2) == writer.file_offset("a") + 42
        with pytest.raises(ValueError, match="follow"):  # a's last 8 bytes are not in the run
            writer.write_run([("a", 0, 32), ("b", 0, 12)], raw[:32] + raw[40:])
        writer.write_run([("a", 8, 32), ("b", 0, 12)], raw[8:])
        assert writer.missing == {"a"}
        writer.write_run([("a", 0, 8)], raw[:8])
    got = load_file(path)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


def test_an_output_under_a_file_or_on_a_directory_is_one_sentence_before_any_write(tmp_path):
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"keep")
    a_folder = tmp_path / "dir.safetensors"
    a_folder.mkdir()
    spec = [TensorSpec("w", "F32", (2,))]
    for path, words in ((a_file / "x.safetensors", "is a file, not a folder"),
                        (a_folder, "is a directory")):
        with pytest.raises(UserError, match=words):
            StreamingWriter(path, spec)
    assert a_file.read_bytes() == b"keep" and list(a_folder.iterdir()) == []


# Folders no one can create a file in, root included (tests may run as root, whom permissions
# do not stop): stand-ins for a read-only mount or another user's folder.
UNWRITABLE = [(Path("/proc/x.safetensors"), "its folder /proc cannot be written"),
              (Path("/sys/x.safetensors"), "its folder /sys cannot be written"),
              (Path("/sys/new/x.safetensors"),
               "its folder /sys/new would be made in /sys, which cannot be written")]


@pytest.mark.parametrize(("path", "words"), UNWRITABLE)
def test_an_output_folder_that_cannot_be_written_is_one_sentence_before_any_write(path, words):
    with pytest.raises(UserError, match=words):
        StreamingWriter(path, [TensorSpec("w", "F32", (2,))])


def test_a_partial_name_that_cannot_be_opened_is_one_sentence(tmp_path):
    """The folder can be written, yet NAME.partial cannot be opened (here: a folder took that
    name); the writer's own check has passed, and its open says why in one sentence."""
    (tmp_path / "m.safetensors.partial").mkdir()
    with pytest.raises(UserError, match="m.safetensors: cannot be written in "):
        StreamingWriter(tmp_path / "m.safetensors", [TensorSpec("w", "F32", (2,))])
    assert (tmp_path / "m.safetensors.partial").is_dir()


def test_merge_convert_and_recipe_extract_refuse_such_outputs_in_one_sentence(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", seed=1)
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", seed=2)
    recipe = tmp_path / "ws.yaml"
    recipe.write_text("version: 1\nmodels: {a: a.safetensors, b: b.safetensors}\n"
                      "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"
                      "output: {path: out/ws.safetensors}\n")
    (tmp_path / "dir.safetensors").mkdir()
    refused = [("merge", recipe, "--out", a / "x.safetensors"),
               ("merge", recipe, "--out", tmp_path / "dir.safetensors"),
               ("convert", a, b / "x.safetensors"),
               *(("merge", recipe, "--out", path) for path, _ in UNWRITABLE[:2]),
               *(("convert", a, path) for path, _ in UNWRITABLE[:2])]
    for args in refused:
        assert one_sentence(run_cli(*args)).startswith("error: ")
    assert run_cli("merge", recipe).returncode == 0
    merged = tmp_path / "out" / "ws.safetensors"
    for target in (tmp_path / "out", a / "r.yaml", "/proc/r.yaml"):
        assert one_sentence(run_cli("recipe", "extract", merged, "-o", target))
    made = run_cli("recipe", "extract", merged, "-o", tmp_path / "new" / "again.yaml")
    assert made.returncode == 0, made.stderr
    assert "weighted_sum" in (tmp_path / "new" / "again.yaml").read_text()
    assert sorted(p.name for p in tmp_path.rglob("*.partial")) == []


def one_sentence(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_metadata_rewritten_shorter_is_padded_and_longer_is_refused(tmp_path):
    out = tmp_path / "m.safetensors"
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with StreamingWriter(out, [TensorSpec("w", "F32", (2, 3))], {"lineage": "x" * 200}) as writer:
        writer.write("w", w)
        with pytest.raises(ValueError, match="longer"):
            writer.rewrite_metadata({"lineage": "x" * 300})
        writer.rewrite_metadata({"lineage": "y"})  # hashes that turned out equal: fewer entries
    assert read_header(out).metadata == {"lineage": "y"}
    assert torch.equal(load_file(out)["w"], w)
