"""Loading .ckpt/.pt pickles safely: containers, flattening, refusals, one-sentence errors."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.pickled import (
    PICKLE_SUFFIXES,
    load_pickle_checkpoint,
    load_pickle_state_dict,
    sniff_format,
)
from mergekit_sd.io.writer import StreamingWriter, TensorSpec, build_header

REPO = Path(__file__).resolve().parents[1]


def tiny_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 3, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(4, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(2, 4, generator=g).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(7)[None],
    }


def save(obj, path: Path, zip_format: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name].contiguous().reshape(-1).view(torch.uint8),
                           tensor.contiguous().reshape(-1).view(torch.uint8)), name


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mergekit_sd.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_lightning_style_ckpt_loads_bit_exactly(tmp_path, zip_format):
    sd = tiny_state_dict()
    path = save({"state_dict": sd, "global_step": 5}, tmp_path / "model.ckpt", zip_format)

    checkpoint = load_pickle_checkpoint(path)

    assert_bit_exact(checkpoint.tensors, sd)
    assert checkpoint.container == "state_dict"
    assert checkpoint.skipped == 1  # global_step
    assert checkpoint.format == ("zip" if zip_format else "legacy")
    assert_bit_exact(load_pickle_state_dict(path), sd)


def test_bare_state_dict_keeps_its_names(tmp_path):
    sd = tiny_state_dict()
    checkpoint = load_pickle_checkpoint(save(sd, tmp_path / "model.pt"))
    assert_bit_exact(checkpoint.tensors, sd)
    assert checkpoint.container is None
    assert checkpoint.skipped == 0


def test_nested_dicts_are_flattened_and_non_tensors_skipped(tmp_path):
    a, b = torch.ones(2), torch.zeros(3)
    obj = {"emb": {"string_to_param": {"*": a}, "name": "tok", "step": 3}, "other": b,
           "epoch": 1, "hparams": {"lr": 1e-4}}
    checkpoint = load_pickle_checkpoint(save(obj, tmp_path / "emb.pt"))
    assert list(checkpoint.tensors) == ["emb.string_to_param.*", "other"]
    assert checkpoint.skipped == 4  # name, step, epoch, hparams.lr


def test_params_ema_is_preferred_over_params(tmp_path):
    ema, raw = {"conv.weight": torch.full((2,), 2.0)}, {"conv.weight": torch.full((2,), 1.0)}
    path = save({"params": raw, "params_ema": ema}, tmp_path / "esrgan.pth")
    checkpoint = load_pickle_checkpoint(path)
    assert checkpoint.container == "params_ema"
    assert torch.equal(checkpoint.tensors["conv.weight"], ema["conv.weight"])


def test_container_key_without_tensors_is_not_unwrapped(tmp_path):
    # "model" here is a name, not weights: the top-level tensors are the state dict.
    path = save({"model": "resnet", "fc.weight": torch.ones(2)}, tmp_path / "m.pt")
    checkpoint = load_pickle_checkpoint(path)
    assert list(checkpoint.tensors) == ["fc.weight"]
    assert checkpoint.container is None
    assert checkpoint.skipped == 1


def test_nested_containers_are_unwrapped(tmp_path):
    path = save({"module": {"state_dict": {"w": torch.ones(1)}, "x": 1}}, tmp_path / "m.pt")
    checkpoint = load_pickle_checkpoint(path)
    assert list(checkpoint.tensors) == ["w"]
    assert checkpoint.container == "module.state_dict"


def test_views_sharing_one_storage_load_with_their_own_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    sd = {"base": base, "slice": base[4:10], "t": base[:12].view(3, 4).t()}
    got = load_pickle_state_dict(save(sd, tmp_path / "views.ckpt"))
    for name, tensor in sd.items():
        assert torch.equal(got[name], tensor), name


def test_lightning_model_checkpoint_callback_does_not_block_loading(tmp_path, monkeypatch):
    """Old Lightning ckpts (SD 1.x, LDSR) pickle the ModelCheckpoint class next to the weights."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ran = []

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run if the real class were used
            ran.append(state)

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    sd = tiny_state_dict()
    instance = ModelCheckpoint()
    instance.best_model_path = "/somewhere/last.ckpt"
    obj = {"state_dict": sd, "callbacks": {ModelCheckpoint: {"best_model_score": None}},
           "instance": instance, "global_step": 10}
    path = save(obj, tmp_path / "sd-v1.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)  # loading must not need (or import) Lightning

    checkpoint = load_pickle_checkpoint(path)

    assert_bit_exact(checkpoint.tensors, sd)
    assert checkpoint.skipped == 3
    assert ran == []
    assert "pytorch_lightning" not in sys.modules


def test_numpy_scalars_next_to_the_weights_are_skipped(tmp_path):
    np = pytest.importorskip("numpy")
    sd = tiny_state_dict()
    path = save({"state_dict": sd, "best_score": np.float64(0.25)}, tmp_path / "m.ckpt")
    checkpoint = load_pickle_checkpoint(path)
    assert_bit_exact(checkpoint.tensors, sd)
    assert checkpoint.skipped == 1


# --- code in the pickle is refused, never run ---------------------------------------------


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class UnknownClass:
    """An ordinary class the safe loader has never heard of."""


def payload_checkpoint(tmp_path: Path, kind: str, zip_format: bool) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    payload = {"system": SystemPayload, "exec": ExecPayload}.get(kind)
    value = payload(marker) if payload else UnknownClass()
    sd = {"state_dict": {"w": torch.ones(2), "evil": value}, "global_step": 5}
    path = save(sd, tmp_path / f"evil-{kind}.ckpt", zip_format)
    return path, marker


@pytest.mark.parametrize("payload", ["system", "exec"])
def test_the_payloads_really_create_the_marker_when_called(tmp_path, payload):
    # What an unrestricted unpickler would do: call the reduce function. Proves the refusal
    # tests below would notice a loader that runs the file's code.
    marker = tmp_path / "MARKER"
    obj = {"system": SystemPayload, "exec": ExecPayload}[payload](marker)
    function, args = obj.__reduce__()
    function(*args)
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(("payload", "named"), [
    ("system", "posix.system" if os.name == "posix" else "nt.system"),
    ("exec", "exec"),
    ("unknown", "test_pickled.UnknownClass"),
])
def test_pickle_that_would_run_code_is_refused(tmp_path, zip_format, payload, named):
    path, marker = payload_checkpoint(tmp_path, payload, zip_format)

    with pytest.raises(BadModelFile) as info:
        load_pickle_state_dict(path)

    message = str(info.value)
    assert not marker.exists()
    assert message.startswith(f"{path}: was refused because loading it would run code")
    assert named in message
    assert "only if you trust its source" in message
    assert "\n" not in message


def test_cli_refuses_malicious_pickle_with_one_line_and_exit_2(tmp_path):
    path, marker = payload_checkpoint(tmp_path, "system", zip_format=True)
    target = tmp_path / "out.safetensors"

    result = run_cli("convert", str(path), str(target), cwd=tmp_path)

    assert result.returncode == 2
    assert not marker.exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "would run code from the file" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not target.exists()
    assert not (tmp_path / "out.safetensors.partial").exists()


# --- files that are not (complete) checkpoints ---------------------------------------------


def make_bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "bad.ckpt"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(7, 250)) * 8)
    elif kind == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    elif kind == "safetensors":
        save_file({"w": torch.ones(3)}, path)
    elif kind == "plain-zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    elif kind in ("truncated-zip", "truncated-legacy"):
        full = save({"state_dict": tiny_state_dict()}, tmp_path / "full.ckpt",
                    zip_format=kind == "truncated-zip")
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(("kind", "problem"), [
    ("missing", "does not exist"),
    ("directory", "is a directory, not a model file"),
    ("empty", "is empty"),
    ("random", "is not a PyTorch checkpoint"),
    ("text", "is not a PyTorch checkpoint"),
    ("safetensors", "is a safetensors file, not a PyTorch pickle"),
    ("plain-zip", "is a zip archive but not a PyTorch checkpoint"),
    ("truncated-zip", "is a truncated or corrupt PyTorch checkpoint"),
    ("truncated-legacy", "is a truncated or corrupt PyTorch checkpoint"),
])
def test_bad_files_get_one_sentence(tmp_path, kind, problem):
    path = make_bad_file(tmp_path, kind)
    with pytest.raises(BadModelFile) as info:
        load_pickle_state_dict(path)
    assert info.value.problem.startswith(problem)
    assert str(info.value) == f"{path}: {info.value.problem}"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_every_truncation_point_reads_as_truncated_not_as_code(tmp_path, zip_format):
    """A download cut anywhere (even inside a GLOBAL's name) is reported as damaged."""
    full = save({"state_dict": {"w": torch.arange(6.0)}, "step": 1}, tmp_path / "f.ckpt",
                zip_format)
    data = full.read_bytes()
    path = tmp_path / "cut.ckpt"
    problems = set()
    for cut in range(4, len(data)):  # shorter than the 4-byte zip magic: just "not a checkpoint"
        path.write_bytes(data[:cut])
        with pytest.raises(BadModelFile) as info:
            load_pickle_state_dict(path)
        problems.add(info.value.problem)
    assert problems == {"is a truncated or corrupt PyTorch checkpoint"
                        + (" (a damaged zip archive)" if zip_format else "")
                        + "; download it again"}


def test_holding_no_tensors_is_an_error(tmp_path):
    path = save({"global_step": 5, "state_dict": {}}, tmp_path / "empty.ckpt")
    with pytest.raises(BadModelFile, match="holds no tensors"):
        load_pickle_state_dict(path)


def test_a_bare_tensor_is_not_a_state_dict(tmp_path):
    path = save(torch.ones(3), tmp_path / "t.pt")
    with pytest.raises(BadModelFile, match="holds a Tensor, not a dictionary"):
        load_pickle_state_dict(path)


def test_safetensors_whose_header_length_looks_like_a_pickle_opcode(tmp_path):
    # A header length of 0x0280 makes the file start 80 02, the opening of a protocol-2 pickle.
    spec = [TensorSpec("w", "F32", (2,))]
    for pad in range(2000):
        metadata = {"pad": "x" * pad}
        header, _ = build_header(spec, metadata)
        if header[:2] == b"\x80\x02":
            break
    path = tmp_path / "renamed.ckpt"
    with StreamingWriter(path.with_suffix(".safetensors"), spec, metadata) as writer:
        writer.write("w", torch.ones(2))
    path.with_suffix(".safetensors").rename(path)
    head = path.read_bytes()[:9]
    assert head[:2] == b"\x80\x02"
    assert sniff_format(head, path.stat().st_size) == "safetensors"
    with pytest.raises(BadModelFile, match="is a safetensors file"):
        load_pickle_state_dict(path)


def test_pickle_suffixes():
    assert set(PICKLE_SUFFIXES) == {".ckpt", ".pt", ".pth", ".bin"}
