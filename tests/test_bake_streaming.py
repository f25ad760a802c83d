"""The machinery that makes a bake fast: chunked read-ahead, weights changed in their own dtype
in the read buffer, and the on-disk caches of key maps and file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sd.arch import keymap, keymap_cache
from mergekit_sd.arch.keymap import diffusers_key_maps
from mergekit_sd.io import direct, hash_cache
from mergekit_sd.io.chunks import ChunkReader, landing_in, plan_chunks, write_runs
from mergekit_sd.io.hashing import file_sha256
from mergekit_sd.io.header import read_header
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
from mergekit_sd.lora.bake import LoraUse, apply_loras, exact_in, plan_bake
from mergekit_sd.lora.bake_run import run_bake
from mergekit_sd.testing import write_checkpoint, write_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_SD_CACHE", str(folder))
    keymap._cached_maps.cache_clear()  # maps this process derived already stay in memory
    return folder


def file_order(header):
    return sorted(header.tensors, key=lambda k: header.tensors[k].start)


def run_without_diffusers(script: str, cache: os.PathLike | None = None):
    """Run `script` in a fresh process where importing diffusers fails (deriving key maps
    would fail loudly), with `cache` as the cache folder when given."""
    env = {**os.environ, "PYTHONPATH": REPO}
    if cache is not None:
        env["MERGEKIT_SD_CACHE"] = str(cache)
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['diffusers'] = None\n"
                           + script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


# --- chunks --------------------------------------------------------------------------------------


def test_chunks_cover_every_byte_once_and_never_split_a_whole_tensor(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F32")
    header = read_header(path)
    order = file_order(header)
    big = sorted(order, key=lambda k: -header.tensors[k].nbytes)
    whole = set(big[:40:2])  # some of the largest, so chunk boundaries must move around them
    size = header.tensors[big[0]].nbytes // 3  # smaller than the largest tensors
    chunks = plan_chunks(header, order, whole, size)

    covered = {k: 0 for k in order}
    for chunk in chunks:
        at = 0
        for piece in chunk.pieces:
            info = header.tensors[piece.key]
            assert piece.at == at and chunk.start + at == info.start + piece.offset
            if piece.key in whole:
                assert piece.offset == 0 and piece.size == info.nbytes
            covered[piece.key] += piece.size
            at += piece.size
        assert at == chunk.size
        assert chunk.size <= size or len(chunk.pieces) == 1  # only a whole tensor exceeds it
    assert covered == {k: header.tensors[k].nbytes for k in order}
    assert any(len({p.key for p in c.pieces}) > 1 for c in chunks)  # small ones share chunks
    assert any(p.offset for c in chunks for p in c.pieces)  # copy-only tensors were cut


def test_scattered_tensors_are_gathered_into_full_chunks(tmp_path):
    """Every other tensor (as the tensors no LoRA names lie between those it changes): chunks
    are filled from several runs of the file, each piece read from its own place."""
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F16")
    header = read_header(path)
    every_other = file_order(header)[::2]
    size = 64 << 10
    chunks = plan_chunks(header, every_other, set(), size)
    total = sum(header.tensors[k].nbytes for k in every_other)
    assert len(chunks) == -(-total // size)  # all full but the last
    assert max(len(c.ranges) for c in chunks) > 10
    data = path.read_bytes()
    with SafetensorsReader(path) as reader, ChunkReader(reader, chunks, size) as reading:
        for chunk in reading:
            for piece in chunk.pieces:
                start = header.tensors[piece.key].start + piece.offset
                assert bytes(chunk.bytes_of(piece)) == data[start:start + piece.size]
            reading.release(chunk)


def test_the_chunk_reader_gives_the_files_bytes_with_few_buffers(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F16")
    header = read_header(path)
    chunks = plan_chunks(header, file_order(header), set(), 16 << 10)
    data = path.read_bytes()
    buffers = set()
    with SafetensorsReader(path) as reader, \
            ChunkReader(reader, chunks, 16 << 10, buffers=3) as reading:
        for chunk in reading:
            assert bytes(chunk.view) == data[chunk.start:chunk.start + chunk.size]
            buffers.add(id(chunk._buffer))
            reading.release(chunk)
    assert len(chunks) > 20 and len(buffers) == 3


def test_whole_tensors_a_little_larger_than_a_chunk_reuse_the_first_buffers(tmp_path):
    """Buffers start large enough for any chunk up to twice the chunk size: one replaced by a
    larger one would be fresh memory, zeroed by the kernel page by page."""
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F16")
    header = read_header(path)
    order = file_order(header)
    size = 16 << 10
    whole = {k for k in order if size < header.tensors[k].nbytes <= 2 * size}
    chunks = plan_chunks(header, order, whole, size)
    assert any(c.size > size for c in chunks)
    buffers = {}  # kept alive, so that no two of them can share an id
    with SafetensorsReader(path) as reader, \
            ChunkReader(reader, chunks, size, buffers=3) as reading:
        for chunk in reading:
            buffers[id(chunk._buffer)] = chunk._buffer
            reading.release(chunk)
    # a replaced buffer would be a larger one beside those of the first size
    assert len(buffers) == 3 and len({len(b) for b in buffers.values()}) == 1


def test_a_copy_through_chunks_is_one_in_place_write_per_chunk(tmp_path, monkeypatch):
    """Each chunk lands in its buffer at the offset within a block where it goes in the output
    (whose header is a different length), so the writer sends it out from there: the copy is
    byte for byte the file, with one write per chunk and nothing large staged."""
    monkeypatch.setattr(direct, "IN_PLACE_FROM_BYTES", 4 << 10)
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F16")
    header = read_header(path)
    order = file_order(header)
    size = 64 << 10
    chunks = plan_chunks(header, order, set(order[::7]), size)
    runs, in_place, real_run = [], [], StreamingWriter.write_run
    monkeypatch.setattr(StreamingWriter, "write_run",
                        lambda self, parts, data: runs.append(parts) or real_run(self, parts, data))
    real_in_place = direct.DirectAppender._write_in_place
    monkeypatch.setattr(direct.DirectAppender, "_write_in_place",
                        lambda self, view: in_place.append(len(view)) or real_in_place(self, view))
    out = tmp_path / "copy.safetensors"
    with SafetensorsReader(path) as reader:
        specs = [TensorSpec(k, header.tensors[k].dtype, header.tensors[k].shape) for k in order]
        with StreamingWriter(out, specs, {"longer": "metadata" * 3}, direct=True) as writer, \
                ChunkReader(reader, chunks, size, landing=landing_in(writer)) as reading:
            for chunk in reading:
                offset = writer.file_offset(chunk.pieces[0].key, chunk.pieces[0].offset)
                assert direct.address_of(chunk.view) % direct.BLOCK == offset % direct.BLOCK
                write_runs(writer, chunk, chunk.pieces)
                reading.release(chunk)
    assert len(runs) == len(chunks)
    got, want = load_file(out), load_file(path)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if writer.direct_io:  # the file system took O_DIRECT
        assert sum(in_place) > header.file_size - header.data_start - len(chunks) * 2 * 4096


def test_tensors_larger_than_a_chunk_are_held_no_more_than_the_buffers_allow(tmp_path):
    """Each gets a buffer of its own, but the read-ahead must not run on allocating them while
    the consumer holds `buffers` chunks (memory would grow with the file)."""
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F32")
    header = read_header(path)
    order = file_order(header)
    size = 4 << 10
    big = [k for k in order if header.tensors[k].nbytes > size]
    chunks = plan_chunks(header, big, set(big), size)
    with SafetensorsReader(path) as reader, \
            ChunkReader(reader, chunks, size, buffers=2) as reading:
        chunks_in = iter(reading)
        held = [next(chunks_in), next(chunks_in)]
        assert all(c.size > size for c in held)
        time.sleep(0.3)  # time for the read-ahead to run on, if it could
        assert reading._ready.empty()
        reading.release(held[0])
        third = next(chunks_in)
        assert third.index == 2
        reading.release(held[1])
        reading.release(third)
        for chunk in chunks_in:
            reading.release(chunk)


# --- weights changed in their own dtype ----------------------------------------------------------


@pytest.mark.parametrize(("variant", "kind", "dtype"), [
    ("sdxl", "kohya-sdxl", "F16"), ("sdxl", "kohya-sdxl", "BF16"),
    ("flux-dev", "diffusers-flux", "BF16")])
def test_in_place_low_precision_bakes_round_like_the_fp32_route(tmp_path, variant, kind, dtype):
    """A plain LoRA whose factors share the base's dtype is fused in that dtype in the read
    buffer, and so are the separate q, k and v modules on their own rows of a fused qkv (SDXL's
    second text encoder, FLUX); the matrix kernel accumulates in fp32 and rounds once, so the
    result must be the fp32 route's rounded result up to the summation order: at most one unit
    in the last place, and on almost no elements."""
    base = write_checkpoint(tmp_path / "base.safetensors", variant, dtype=dtype)
    lora = write_lora(tmp_path / "l.safetensors", kind, rank=8, dtype=dtype)
    plan = plan_bake(base, [LoraUse("l", lora, 0.7)], tmp_path / "out.safetensors")
    baked, original = load_file(run_bake(plan)), load_file(base)
    low = getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[dtype])
    checked = differing = elements = 0
    for key, apps in plan.weights.items():
        expected = apply_loras(original[key].float(), apps, bias=False).to(low)
        got = baked[key]
        assert got.dtype == low
        ulp = torch.abs(expected.float()).clamp_min(1e-30)
        ulp = torch.pow(2.0, torch.floor(torch.log2(ulp)) - (10 if dtype == "F16" else 7))
        ulp = ulp.clamp_min(torch.finfo(low).tiny * torch.finfo(low).eps)  # subnormals' step
        off = (got.float() - expected.float()).abs()
        assert (off <= ulp * 1.0001).all(), key
        differing += int((got != expected).sum())
        elements += got.numel()
        checked += 1
    assert checked > 50 and differing <= elements * 1e-3
    assert any(len(apps) == 3 for apps in plan.weights.values())  # a fused qkv among them
    for key in original.keys() - plan.weights.keys() - plan.biases.keys():
        assert torch.equal(baked[key], original[key]), key


def test_modules_sharing_rows_are_not_baked_in_low_precision(tmp_path):
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sdxl", rank=4, dtype="F16")
    plan = plan_bake(base, [LoraUse("l", lora, 0.7)], tmp_path / "out.safetensors")
    key, apps = next((k, a) for k, a in plan.weights.items() if len(a) == 3)
    rows = plan.header.tensors[key].shape[0]
    assert exact_in(apps, torch.float16, rows)
    assert not exact_in(apps, torch.bfloat16, rows)  # factors in another dtype
    shifted = replace(apps[1], target=replace(apps[1].target, rows=(1, rows // 3 + 1)))
    assert not exact_in([apps[0], shifted, apps[2]], torch.float16, rows)  # rows overlap


def test_several_loras_on_one_weight_still_add_up_in_fp32(tmp_path):
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
    a = write_lora(tmp_path / "a.safetensors", "kohya-sd1", seed=1)
    b = write_lora(tmp_path / "b.safetensors", "kohya-sd1", seed=2)
    plan = plan_bake(base, [LoraUse("a", a, 0.6), LoraUse("b", b, -0.4)],
                     tmp_path / "out.safetensors")
    baked, original = load_file(run_bake(plan)), load_file(base)
    for key, apps in plan.weights.items():
        assert len(apps) == 2
        expected = apply_loras(original[key].float(), apps, bias=False).half()
        assert torch.equal(baked[key], expected), key  # one rounding, exactly


# --- key maps cached on disk ---------------------------------------------------------------------


def test_key_maps_are_derived_once_then_read_without_diffusers(tmp_path, cache):
    path = write_checkpoint(tmp_path / "m.safetensors", "sdxl", dtype="F16")
    shapes = {k: i.shape for k, i in read_header(path).tensors.items()}
    derived = diffusers_key_maps(shapes)
    assert list((cache / "keymaps").glob("*.json"))
    # a fresh process where importing diffusers fails: the maps must come from the cache
    script = (
        "import json\n"
        "from mergekit_sd.arch.keymap import diffusers_key_maps\n"
        "from mergekit_sd.io.header import read_header\n"
        f"h = read_header({str(path)!r})\n"
        "maps = diffusers_key_maps({k: i.shape for k, i in h.tensors.items()})\n"
        "print(json.dumps({c: {n: [[[s.key, s.start, s.stop] for s in src.segments],"
        " src.transposed] for n, src in m.items()} for c, m in maps.items()}))\n")
    again = json.loads(run_without_diffusers(script).stdout)
    assert again == {c: {n: [[[s.key, s.start, s.stop] for s in src.segments], src.transposed]
                         for n, src in m.items()} for c, m in derived.items()}


def test_a_corrupt_key_map_entry_is_derived_again(tmp_path, cache):
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F16")
    items = tuple((k, tuple(i.shape)) for k, i in read_header(path).tensors.items())
    maps = keymap_cache.load(items)
    assert maps is None
    diffusers_key_maps(dict(items))
    entry = next((cache / "keymaps").glob("*.json"))
    assert keymap_cache.load(items) is not None
    entry.write_text('{"keys": ["x"], "maps": [["unet", {"a": [[[7, 0, 1]], false]}]]}')
    assert keymap_cache.load(items) is None  # an index out of range: not trusted


# --- file hashes remembered ----------------------------------------------------------------------


def clock_ahead(monkeypatch):
    """The hash cache's clock a minute ahead: files written by the test count as settled."""
    monkeypatch.setattr(hash_cache, "time",
                        SimpleNamespace(time_ns=lambda: time.time_ns() + 60_000_000_000))


@pytest.fixture
def later(monkeypatch):
    clock_ahead(monkeypatch)


def test_a_hash_is_remembered_for_an_unchanged_file_only(tmp_path, cache, later):
    path = tmp_path / "m.bin"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    assert hash_cache.known_sha256(path) == first == hashlib.sha256(b"a" * 1000).hexdigest()
    stamp = os.stat(path)
    path.write_bytes(b"b" * 1000)  # same size, then the old times put back
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert hash_cache.known_sha256(path) is None  # the change time gives it away
    assert file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_file_changed_moments_ago_is_not_remembered(tmp_path, cache, monkeypatch):
    path = tmp_path / "m.bin"
    path.write_bytes(b"fresh")
    file_sha256(path)
    assert hash_cache.known_sha256(path) is None
    clock_ahead(monkeypatch)
    file_sha256(path)
    assert hash_cache.known_sha256(path) == hashlib.sha256(b"fresh").hexdigest()


def test_an_unwritable_cache_folder_only_costs_time(tmp_path, monkeypatch, later):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MERGEKIT_SD_CACHE", str(blocker / "cache"))
    path = tmp_path / "m.bin"
    path.write_bytes(b"x")
    assert file_sha256(path) == hashlib.sha256(b"x").hexdigest()
    assert hash_cache.known_sha256(path) is None


def test_a_bake_hashes_the_base_once_and_the_next_bake_not_at_all(tmp_path, cache, later,
                                                                   monkeypatch):
    from mergekit_sd.lora import bake

    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    one = run_bake(plan_bake(base, [LoraUse("l", lora)], tmp_path / "one" / "out.safetensors"))
    assert hash_cache.known_sha256(base) == hashlib.sha256(base.read_bytes()).hexdigest()

    def no_hashing(path):
        pytest.fail("the base was hashed again")

    monkeypatch.setattr(bake, "BackgroundSha256", no_hashing)
    two = run_bake(plan_bake(base, [LoraUse("l", lora)], tmp_path / "two" / "out.safetensors"))
    recipe = json.loads(read_header(two).metadata["mergekit_sd.recipe"])
    assert recipe["models"]["base"]["sha256"] == hash_cache.known_sha256(base)
    # the same bytes, whether the base's hash had to be computed or was remembered
    assert json.loads(read_header(one).metadata["mergekit_sd.recipe"]) == recipe
    assert one.read_bytes() == two.read_bytes()


@pytest.mark.parametrize("fails", ["planning", "loading", "streaming"])
def test_a_bake_that_fails_stops_hashing_the_base(tmp_path, monkeypatch, fails):
    from mergekit_sd.errors import UserError
    from mergekit_sd.lora import bake, bake_run

    started = []

    class Recorded(bake.BackgroundSha256):
        def __init__(self, path):
            super().__init__(path)
            started.append(self)

    def failing(*args, **kwargs):
        raise UserError(f"{fails} failed")

    monkeypatch.setattr(bake, "BackgroundSha256", Recorded)
    monkeypatch.setattr(*{"planning": (bake, "TargetIndex"), "loading": (bake, "match_loras"),
                          "streaming": (bake_run, "_bake_chunks")}[fails], failing)
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    with pytest.raises(UserError, match=f"{fails} failed"):
        run_bake(plan_bake(base, [LoraUse("l", lora)], tmp_path / "out.safetensors"))
    assert started and not started[0]._thread.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]


def test_the_output_begins_before_the_loras_are_loaded_and_torch_imported(tmp_path, cache):
    """`prepare_bake` reads headers only; `BakeStream` then copies the tensors no LoRA names
    (laid first in the output) with torch not yet imported. The result is an ordinary bake."""
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sdxl", rank=4)
    plan = plan_bake(base, [LoraUse("l", lora, 0.6)], tmp_path / "usual" / "out.safetensors")
    untouched = [k for k in file_order(plan.header) if k not in plan.touched]
    touched = [k for k in file_order(plan.header) if k in plan.touched]
    assert untouched and touched and set(touched) == plan.weights.keys() | plan.biases.keys()
    usual = run_bake(plan)
    assert file_order(read_header(usual)) == untouched + touched
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mergekit_sd.lora.bake import LoraUse, load_loras, prepare_bake\n"
        "from mergekit_sd.lora.bake_run import BakeStream\n"
        f"plan = prepare_bake(Path({str(base)!r}), [LoraUse('l', Path({str(lora)!r}), 0.6)],\n"
        f"                    {str(tmp_path / 'early' / 'out.safetensors')!r})\n"
        "with BakeStream(plan) as stream:\n"
        "    stream._thread.join()\n"
        "    assert 'torch' not in sys.modules\n"
        "    load_loras(plan)\n"
        "    stream.finish()\n")
    run_without_diffusers(script, cache)  # the key maps the first bake derived are cached
    assert (tmp_path / "early" / "out.safetensors").read_bytes() == usual.read_bytes()


@pytest.mark.parametrize("ends", ["finished", "aborted"])
def test_the_gil_changes_hands_often_only_while_the_untouched_tensors_are_copied(
        tmp_path, monkeypatch, ends):
    """The copy beside torch's import runs with a short switch interval (`COPY_SWITCH_S`);
    the process gets its own back however the bake ends."""
    import threading

    from mergekit_sd.errors import UserError
    from mergekit_sd.lora import bake_run

    seen = []
    real_write_runs = bake_run.write_runs

    def recording(*args):
        if threading.current_thread().name == "copy-untouched":
            seen.append(sys.getswitchinterval())
        return real_write_runs(*args)

    def failing(*args, **kwargs):
        raise UserError("baking failed")

    monkeypatch.setattr(bake_run, "write_runs", recording)
    if ends == "aborted":
        monkeypatch.setattr(bake_run, "_bake_chunks", failing)
    own, original = 0.004, sys.getswitchinterval()
    sys.setswitchinterval(own)
    try:
        base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
        lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1", rank=4)
        plan = plan_bake(base, [LoraUse("l", lora)], tmp_path / "out.safetensors")
        if ends == "aborted":
            with pytest.raises(UserError, match="baking failed"):
                run_bake(plan)
        else:
            run_bake(plan)
        assert seen and set(seen) == {bake_run.COPY_SWITCH_S}
        assert sys.getswitchinterval() == pytest.approx(own)
    finally:
        sys.setswitchinterval(original)


def test_bakes_that_overlap_leave_the_processs_own_switch_interval():
    from mergekit_sd.lora.bake_run import COPY_SWITCH_S, _short_switch_interval

    original = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        first, second = _short_switch_interval(), _short_switch_interval()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # the first copy ends while the second runs
        assert sys.getswitchinterval() == pytest.approx(COPY_SWITCH_S)
        second.__exit__(None, None, None)
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(original)


def test_a_lora_for_another_architecture_is_refused_before_any_key_map_is_derived(tmp_path):
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    script = (
        "from pathlib import Path\n"
        "from mergekit_sd.errors import UserError\n"
        "from mergekit_sd.lora.bake import LoraUse, plan_bake\n"
        "try:\n"
        f"    plan_bake(Path({str(base)!r}), [LoraUse('l', Path({str(lora)!r}))], 'o')\n"
        "except UserError as exc:\n"
        "    print(exc)\n")
    done = run_without_diffusers(script, tmp_path / "empty")
    assert "this LoRA is for" in done.stdout and "pick a LoRA made for" in done.stdout, done.stdout


@pytest.mark.parametrize("fmt", ["kohya-flux", "aitoolkit-flux", "xlabs-flux", "kohya-sd3"])
def test_loras_in_the_checkpoints_own_names_bake_without_deriving_key_maps(tmp_path, fmt):
    """Only names in diffusers' vocabulary need the derived key maps (and so diffusers, the
    first time); these formats name the checkpoint's own weights. The bake, with diffusers
    unimportable and no cached maps, must give the very bytes of an ordinary bake."""
    from mergekit_sd.testing import LORA_BASES

    base = write_checkpoint(tmp_path / "base.safetensors", LORA_BASES[fmt], dtype="BF16")
    lora = write_lora(tmp_path / "l.safetensors", fmt)
    script = (
        "from pathlib import Path\n"
        "from mergekit_sd.lora.bake import LoraUse, plan_bake\n"
        "from mergekit_sd.lora.bake_run import run_bake\n"
        f"plan = plan_bake(Path({str(base)!r}), [LoraUse('l', Path({str(lora)!r}), 0.7)],\n"
        f"                 {str(tmp_path / 'lazy' / 'out.safetensors')!r})\n"
        "assert not plan.unmatched, plan.unmatched\n"
        "run_bake(plan)\n")
    run_without_diffusers(script, tmp_path / "empty")
    run_bake(plan_bake(base, [LoraUse("l", lora, 0.7)], tmp_path / "usual" / "out.safetensors"))
    assert (tmp_path / "lazy" / "out.safetensors").read_bytes() == \
        (tmp_path / "usual" / "out.safetensors").read_bytes()


# --- inspect and bake agree on blocks ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya-sd1", "peft-sd1", "kohya-sdxl", "peft-sdxl"])
def test_inspect_lists_each_module_under_the_block_whose_strength_bake_gives_it(fmt):
    """`inspect` names the blocks a LoRA touches; `bake --blocks` scales each module by its
    weight's block. Every module, including the input/output convs and time embeddings outside
    the numbered blocks, must land in the same block both ways."""
    from mergekit_sd.arch.architectures import ARCHITECTURES
    from mergekit_sd.arch.lora import block_of_module
    from mergekit_sd.lora.targets import TargetIndex
    from mergekit_sd.testing import LORA_BASES, lora_targets
    from mergekit_sd.testing.checkpoints import checkpoint_specs

    base = LORA_BASES[fmt]
    shapes = {s.name: s.shape for s in checkpoint_specs(base, "tiny")}
    index = TargetIndex(shapes, ARCHITECTURES[base], "model.diffusion_model.")
    names = [t.module for t in lora_targets(fmt)]
    kohya = fmt.startswith("kohya")
    names += (["lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_conv_out",
               "lora_unet_out_2"]
              if kohya else ["unet.conv_in", "unet.time_embedding.linear_1", "unet.conv_out"])
    blocks = set()
    for name in names:
        target = index.find(name)
        assert target is not None, name
        expected = "BASE" if target.block == "TE" else target.block
        assert block_of_module(name, base) == expected, name
        blocks.add(expected)
    assert {"BASE", "IN00", "M00"} <= blocks and len(blocks) > 10


def test_planning_a_bake_reads_each_loras_header_once(tmp_path, monkeypatch):
    from mergekit_sd.lora import bake, modules

    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
    loras = [write_lora(tmp_path / f"{n}.safetensors", "kohya-sd1", seed=n) for n in (1, 2)]
    reads: list[str] = []

    def counted(path, *args, **kwargs):
        reads.append(os.path.basename(path))
        return read_header(path, *args, **kwargs)

    monkeypatch.setattr(bake, "read_header", counted)
    monkeypatch.setattr(modules, "read_header", counted)
    plan = plan_bake(base, [LoraUse(p.stem, p) for p in loras], tmp_path / "out.safetensors")
    assert len(plan.files) == 2 and all(f.modules for f in plan.files)
    assert sorted(r for r in reads if r != "base.safetensors") == ["1.safetensors", "2.safetensors"]
