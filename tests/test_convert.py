"""`convert`: pickles and safetensors to safetensors, dtype recasts, refusals, atomic output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sd.convert import convert_to_safetensors
from mergekit_sd.errors import BadModelFile, UserError

REPO = Path(__file__).resolve().parents[1]


def tiny_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, generator=g)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g),
        "first_stage_model.quant_conv.weight": torch.randn(8, 8, 1, 1, generator=g).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
        "flags": torch.tensor([True, False]),
        # views into one storage, as ckpts often hold: written as independent tensors
        "shared.base": base,
        "shared.slice": base[8:16],
        "shared.transposed": base[:12].view(3, 4).t(),
    }


def write_ckpt(tmp_path: Path, zip_format: bool = True, name: str = "model.ckpt") -> Path:
    path = tmp_path / name
    torch.save({"state_dict": tiny_state_dict(), "global_step": 5}, path,
               _use_new_zipfile_serialization=zip_format)
    return path


def header_of(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mergekit_sd.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


# --- pickles to safetensors -----------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_ckpt_round_trips_bit_exactly(tmp_path, zip_format):
    source = write_ckpt(tmp_path, zip_format)
    target = tmp_path / "out" / "model.safetensors"

    written = convert_to_safetensors(source, target)

    assert written == target
    got = load_file(target)
    want = tiny_state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name
    assert not (tmp_path / "out" / "model.safetensors.partial").exists()


def test_views_are_stored_as_independent_byte_ranges(tmp_path):
    target = tmp_path / "model.safetensors"
    convert_to_safetensors(write_ckpt(tmp_path), target)
    header = header_of(target)
    ranges = sorted(entry["data_offsets"] for key, entry in header.items()
                    if key != "__metadata__")
    for (_, end), (begin, _) in zip(ranges, ranges[1:], strict=False):
        assert end == begin  # tiled, no overlap
    assert header["shared.slice"]["shape"] == [8]
    assert header["shared.transposed"]["shape"] == [4, 3]


def test_metadata_names_the_source_file_but_no_directory(tmp_path):
    source = write_ckpt(tmp_path, name="my-model.ckpt")
    target = tmp_path / "model.safetensors"
    convert_to_safetensors(source, target)
    with safe_open(target, "pt") as f:
        metadata = f.metadata()
    assert metadata["mergekit_sd.converted_from"] == "my-model.ckpt"
    assert metadata["mergekit_sd.dtype"] == "keep"
    assert not any(str(tmp_path) in value or "/" in value for value in metadata.values())


def test_cli_convert_with_fp16_casts_floats_but_keeps_integer_tensors(tmp_path):
    source = write_ckpt(tmp_path)
    target = tmp_path / "model-fp16.safetensors"

    result = run_cli("convert", str(source), str(target), "--dtype", "fp16", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {target}"
    got = load_file(target)
    want = tiny_state_dict()
    for name, tensor in want.items():
        if tensor.is_floating_point():
            assert got[name].dtype == torch.float16, name
            assert torch.equal(got[name], tensor.to(torch.float16)), name
        else:
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name
    assert got["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype \
        == torch.int64
    assert load_file(target)  # loads with the reference library
    with safe_open(target, "pt") as f:
        assert f.metadata()["mergekit_sd.dtype"] == "fp16"


@pytest.mark.parametrize(("option", "dtype", "stored"), [
    ("bf16", torch.bfloat16, "BF16"),
    ("fp32", torch.float32, "F32"),
    ("fp8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3"),
    ("fp8_e5m2", torch.float8_e5m2, "F8_E5M2"),
])
def test_other_float_dtypes(tmp_path, option, dtype, stored):
    target = tmp_path / f"model-{option}.safetensors"
    convert_to_safetensors(write_ckpt(tmp_path), target, dtype=option)

    header = header_of(target)
    got = load_file(target)
    for name, tensor in tiny_state_dict().items():
        if tensor.is_floating_point():
            assert header[name]["dtype"] == stored, name
            assert torch.equal(bits(got[name]), bits(tensor.float().to(dtype))), name
        else:
            assert got[name].dtype == tensor.dtype, name


@pytest.mark.parametrize(("option", "dtype"), [
    ("fp8_e4m3fn", torch.float8_e4m3fn),
    ("fp8_e5m2", torch.float8_e5m2),
])
def test_fp8_saturates_out_of_range_weights_instead_of_inf_or_nan(tmp_path, option, dtype):
    """Finite values beyond the range are clamped; an input infinity stays one where the
    dtype has infinities (e5m2), and becomes the largest value where it has none (e4m3fn)."""
    source = tmp_path / "wide.pt"
    torch.save({"w": torch.tensor([1.0, -2.5, 1e6, -1e6, float("inf")])}, source)
    target = tmp_path / "wide.safetensors"
    convert_to_safetensors(source, target, dtype=option)
    got = load_file(target)["w"].float()
    limit = torch.finfo(dtype).max
    infinity = limit if dtype == torch.float8_e4m3fn else float("inf")
    assert got.tolist() == [1.0, -2.5, limit, -limit, infinity]


# --- safetensors to safetensors (recast) -----------------------------------------------------


def write_safetensors(tmp_path: Path, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    sd = {k: v.contiguous().clone() for k, v in tiny_state_dict().items()}
    save_file(sd, path, metadata={"modelspec.title": "Tiny", "format": "pt"})
    return path


def test_safetensors_recast_keeps_metadata_and_integer_tensors(tmp_path):
    source = write_safetensors(tmp_path)
    target = tmp_path / "model-bf16.safetensors"
    seen = []

    convert_to_safetensors(source, target, dtype="bf16", progress=lambda d, t: seen.append((d, t)))

    want = load_file(source)
    got = load_file(target)
    for name, tensor in want.items():
        if tensor.is_floating_point():
            assert torch.equal(bits(got[name]), bits(tensor.to(torch.bfloat16))), name
        else:
            assert torch.equal(got[name], tensor) and got[name].dtype == tensor.dtype, name
    with safe_open(target, "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.title"] == "Tiny"
    assert metadata["mergekit_sd.converted_from"] == "model.safetensors"
    assert metadata["mergekit_sd.dtype"] == "bf16"
    total = len(want)
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_a_merged_files_recipe_is_carried_marked_as_the_recipe_of_the_source(tmp_path):
    recipe = json.dumps({"version": 1, "output": {"dtype": "fp16"}})
    source = tmp_path / "mix.safetensors"
    save_file({"w": torch.ones(2)}, source, metadata={"mergekit_sd.recipe": recipe})
    first, second = tmp_path / "mix-bf16.safetensors", tmp_path / "mix-fp32.safetensors"
    convert_to_safetensors(source, first, dtype="bf16")
    convert_to_safetensors(first, second, dtype="fp32")
    for path in (first, second):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        assert metadata["mergekit_sd.recipe"] == recipe  # how the merge was made, as it was
        assert metadata["mergekit_sd.recipe_output"] == "mix.safetensors"  # ... made that file
    with safe_open(tmp_path / "mix-bf16.safetensors", "pt") as f:
        assert f.metadata()["mergekit_sd.converted_from"] == "mix.safetensors"
    plain = write_safetensors(tmp_path)
    convert_to_safetensors(plain, tmp_path / "plain-bf16.safetensors", dtype="bf16")
    with safe_open(tmp_path / "plain-bf16.safetensors", "pt") as f:
        assert "mergekit_sd.recipe_output" not in f.metadata()


def test_safetensors_keep_copies_bytes_exactly(tmp_path):
    source = write_safetensors(tmp_path)
    target = tmp_path / "copy.safetensors"
    convert_to_safetensors(source, target)
    want, got = load_file(source), load_file(target)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(bits(got[name]), bits(want[name])), name


def test_safetensors_source_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The recast path streams through SafetensorsReader and never loads the whole file."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("convert must not load the whole file")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    source = write_safetensors(tmp_path)
    convert_to_safetensors(source, tmp_path / "out.safetensors", dtype="fp16")
    assert (tmp_path / "out.safetensors").exists()


def test_pickle_named_safetensors_is_refused_with_a_hint(tmp_path):
    source = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, source)
    with pytest.raises(BadModelFile, match="is a PyTorch pickle, not a safetensors file; rename"):
        convert_to_safetensors(source, tmp_path / "out.safetensors")


# --- refusals -------------------------------------------------------------------------------


def test_unknown_dtype_names_the_option_and_the_choices(tmp_path):
    with pytest.raises(UserError) as info:
        convert_to_safetensors(write_ckpt(tmp_path), tmp_path / "o.safetensors", dtype="fp12")
    message = str(info.value)
    assert "--dtype 'fp12'" in message
    for choice in ("keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"):
        assert choice in message
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_unknown_dtype_exits_2(tmp_path):
    result = run_cli("convert", str(write_ckpt(tmp_path)), str(tmp_path / "o.safetensors"),
                     "--dtype", "int4", cwd=tmp_path)
    assert_one_line_error(result, "--dtype 'int4'")


def test_target_must_be_safetensors(tmp_path):
    with pytest.raises(UserError, match=r"must end in \.safetensors"):
        convert_to_safetensors(write_ckpt(tmp_path), tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_cli_target_equal_to_source_is_refused_and_untouched(tmp_path):
    source = write_safetensors(tmp_path)
    before = source.read_bytes()
    result = run_cli("convert", str(source), str(tmp_path / "." / source.name), "--dtype", "fp16",
                     "--overwrite", cwd=tmp_path)
    assert_one_line_error(result, "is the source file itself")
    assert source.read_bytes() == before
    assert not (tmp_path / "model.safetensors.partial").exists()


def test_target_that_is_a_hard_link_to_the_source_is_refused(tmp_path):
    source = write_safetensors(tmp_path)
    link = tmp_path / "link.safetensors"
    os.link(source, link)
    with pytest.raises(UserError, match="is the source file itself"):
        convert_to_safetensors(source, link, overwrite=True)


def test_cli_existing_target_needs_overwrite(tmp_path):
    source = write_ckpt(tmp_path)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")

    result = run_cli("convert", str(source), str(target), cwd=tmp_path)

    assert_one_line_error(result, "already exists", "--overwrite")
    assert target.read_bytes() == b"precious"

    result = run_cli("convert", str(source), str(target), "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(load_file(target)) == list(tiny_state_dict())


@pytest.mark.parametrize("kind", ["safetensors-renamed", "random"])
def test_cli_non_pickles_named_ckpt_exit_2_with_one_sentence(tmp_path, kind):
    source = tmp_path / "model.ckpt"
    if kind == "random":
        source.write_bytes(bytes(range(256)) * 4)
        phrase = "is not a PyTorch checkpoint"
    else:
        save_file({"w": torch.ones(2)}, source)
        phrase = "is a safetensors file, not a PyTorch pickle"
    target = tmp_path / "out.safetensors"
    result = run_cli("convert", str(source), str(target), cwd=tmp_path)
    assert_one_line_error(result, str(source), phrase)
    assert not target.exists()


@pytest.mark.parametrize(("state", "phrase"), [
    ({"state_dict": {"__metadata__": torch.zeros(2), "w": torch.ones(2)}},
     "tensor '__metadata__' cannot be stored under that name"),
    ({"w": torch.empty(3, device="meta")}, "tensor 'w' has no data (a meta tensor)"),
    ({"w\ud800x": torch.ones(2)}, "the tensor name 'w?x' is not valid UTF-8"),
])
def test_pickles_safetensors_cannot_hold_are_one_sentence_and_leave_nothing(tmp_path, state,
                                                                            phrase):
    source = tmp_path / "odd.ckpt"
    torch.save(state, source)
    target = tmp_path / "out.safetensors"
    with pytest.raises(BadModelFile) as caught:
        convert_to_safetensors(source, target)
    assert phrase in str(caught.value) and str(source) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.ckpt"]


def test_cli_missing_source_exits_2(tmp_path):
    result = run_cli("convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "o.safetensors"),
                     cwd=tmp_path)
    assert_one_line_error(result, "does not exist")


# --- interrupted writes leave nothing behind ---------------------------------------------------


def interrupt_after(n: int):
    def progress(done: int, total: int) -> None:
        if done == n:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("source_kind", ["ckpt", "safetensors"])
def test_interrupted_conversion_leaves_no_output_and_no_partial(tmp_path, source_kind):
    source = write_ckpt(tmp_path) if source_kind == "ckpt" else write_safetensors(tmp_path)
    target = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        convert_to_safetensors(source, target, dtype="fp16", progress=interrupt_after(2))
    assert not target.exists()
    assert not (tmp_path / "out.safetensors.partial").exists()


def test_interrupted_overwrite_keeps_the_old_target(tmp_path):
    source = write_ckpt(tmp_path)
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old version")
    with pytest.raises(KeyboardInterrupt):
        convert_to_safetensors(source, target, overwrite=True, progress=interrupt_after(3))
    assert target.read_bytes() == b"old version"
    assert not (tmp_path / "out.safetensors.partial").exists()


def test_refused_pickle_writes_nothing(tmp_path):
    source = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{tmp_path / 'MARKER'}'",))

    torch.save({"w": torch.ones(1), "x": Payload()}, source)
    target = tmp_path / "out.safetensors"
    with pytest.raises(BadModelFile, match="would run code"):
        convert_to_safetensors(source, target)
    assert not (tmp_path / "MARKER").exists()
    assert not target.exists()
    assert not (tmp_path / "out.safetensors.partial").exists()


@pytest.mark.parametrize("kind", ["truncated", "empty", "metadata-int", "directory"])
def test_cli_bad_safetensors_source_is_one_sentence_without_a_traceback(tmp_path, kind):
    # a reader whose header failed must not complain again when it is collected
    source = tmp_path / "bad.safetensors"
    if kind == "truncated":
        save_file({"w": torch.ones(64)}, source)
        source.write_bytes(source.read_bytes()[:-100])
    elif kind == "empty":
        source.write_bytes(b"")
    elif kind == "metadata-int":
        save_file({"w": torch.ones(2)}, source)
        data = source.read_bytes()
        size = int.from_bytes(data[:8], "little")
        doc = json.loads(data[8:8 + size])
        doc["__metadata__"] = {"n": 1}
        header = json.dumps(doc).encode()
        source.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size:])
    else:
        source.mkdir()
    result = run_cli("convert", str(source), str(tmp_path / "out.safetensors"), cwd=tmp_path)
    assert_one_line_error(result, str(source))


@pytest.mark.parametrize("source_kind", ["safetensors", "ckpt"])
def test_cli_fp16_clamps_values_beyond_its_range_and_says_where(tmp_path, source_kind):
    """bf16 and fp32 weights may exceed 65504: a plain cast made them ±inf, which blackens
    every image; they are clamped like fp8's, and a note names the tensors."""
    weights = {"big": torch.tensor([1e5, -7e4, 1.5, 65504.0]), "fine": torch.ones(3),
               "ids": torch.arange(3)}
    if source_kind == "safetensors":
        source = tmp_path / "wide.safetensors"
        save_file({k: v.bfloat16() if v.is_floating_point() else v
                   for k, v in weights.items()}, source)
    else:
        source = tmp_path / "wide.ckpt"
        torch.save({"state_dict": weights}, source)
    target = tmp_path / "narrow.safetensors"
    result = run_cli("convert", str(source), str(target), "--dtype", "fp16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    beyond = 3 if source_kind == "safetensors" else 2  # bf16 rounds 65504 up to 65536
    assert result.stderr.strip() == (f"note: {beyond} values in 1 tensor lay beyond fp16's "
                                     "range (±65504) and were clamped to it instead of "
                                     "becoming infinite: big")
    got = load_file(target)
    assert got["big"].tolist() == [65504.0, -65504.0, 1.5, 65504.0]
    assert got["fine"].dtype == torch.float16 and got["ids"].dtype == torch.int64
    quiet = run_cli("convert", str(source), str(tmp_path / "wide2.safetensors"), "--dtype",
                    "fp32", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.parametrize(("source_kind", "option"), [
    ("safetensors", "fp16"), ("safetensors", "keep"), ("safetensors", "fp32"),
    ("safetensors", "bf16"), ("ckpt", "keep"), ("ckpt", "fp16"),
])
def test_cli_nan_and_infinity_of_the_source_are_named_and_kept(tmp_path, source_kind, option):
    """A NaN or ±inf in the source goes out said, whatever the dtype: a note names the
    tensors and the source. An infinity stays one: a clamp to 65504 would hide the damage
    (and was said as a finite value clamped)."""
    weights = {"a_nan": torch.tensor([float("nan"), 1.0]),
               "b_inf": torch.tensor([1.0, float("-inf"), float("inf")]),
               "c_fine": torch.ones(3), "d_ids": torch.arange(3)}
    source = tmp_path / f"broken.{source_kind}"
    if source_kind == "safetensors":
        save_file(weights, source)
    else:
        torch.save({"state_dict": weights}, source)
    target = tmp_path / "out.safetensors"
    result = run_cli("convert", str(source), str(target), "--dtype", option, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        "note: 1 NaN value and 2 infinite values written in 2 tensors (one such weight "
        f"blackens every image): a_nan, b_inf; {source.name} holds NaN or infinity there")
    got = load_file(target)
    assert got["a_nan"][0].isnan() and got["b_inf"].float().tolist() == [1.0, -math.inf, math.inf]


def test_cli_fp8_e4m3fn_says_an_infinity_is_written_as_its_largest_value(tmp_path):
    source = tmp_path / "broken.safetensors"
    save_file({"w": torch.tensor([1.0, float("inf"), float("nan")])}, source)
    result = run_cli("convert", str(source), str(tmp_path / "out.safetensors"), "--dtype",
                     "fp8_e4m3fn", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "note: 1 NaN value written in 1 tensor (one such weight blackens every image): w; "
        "broken.safetensors holds NaN or infinity there",
        "note: 1 value in 1 tensor was infinite in the input and is written as ±448, as "
        "fp8_e4m3fn has no infinity: w"]


def test_a_dtype_alias_is_recorded_by_the_short_name_a_recipe_records(tmp_path):
    """`--dtype Float16` and a recipe's `dtype: float16` are one dtype, recorded as fp16."""
    target = tmp_path / "model.safetensors"
    convert_to_safetensors(write_ckpt(tmp_path), target, dtype="Float16")
    with safe_open(target, "pt") as f:
        assert f.metadata()["mergekit_sd.dtype"] == "fp16"


def test_the_clamping_note_names_tensors_in_one_order_whatever_order_they_were_met_in():
    """A bake's workers clamp tensors in no fixed order: the note names them sorted, so that
    the same run says the same thing."""
    from mergekit_sd.io.saturate import Clamped

    notes = []
    for order in (["b.weight", "a.weight", "c.weight"], ["c.weight", "a.weight", "b.weight"]):
        clamped = Clamped()
        for name in order:
            clamped.add("F16", name, 1)
            clamped.add_infinite("F8_E4M3", name, 1)
        notes.append(clamped.notes())
    assert notes[0] == notes[1]
    assert notes[0][0].endswith(": a.weight, b.weight, c.weight")
