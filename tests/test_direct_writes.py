"""O_DIRECT output (`io.direct`): the same bytes as ordinary writes in every order of writing,
a file system's refusal turns into ordinary writes, and a failed write leaves no file."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sd.io import direct
from mergekit_sd.io.writer import StreamingWriter, TensorSpec

STAGE = 64 << 10  # small stages: a 1 MB file crosses many of them


@pytest.fixture(autouse=True)
def small_stages(monkeypatch):
    monkeypatch.setattr(direct, "STAGE_BYTES", STAGE)


def tensors() -> dict[str, torch.Tensor]:
    """Odd sizes, so that neither the header nor any tensor ends on a block boundary."""
    g = torch.Generator().manual_seed(3)
    out = {f"t{i:02d}": torch.randn(n, generator=g).half()
           for i, n in enumerate((7, 40_000, 3, 130_001, 2_049, 65_536, 99_999, 1))}
    out["big"] = torch.randn(200_003, generator=g)
    return out


def specs(ts):
    return [TensorSpec(n, "F16" if t.dtype == torch.float16 else "F32", tuple(t.shape))
            for n, t in ts.items()]


def write(path, ts, direct_io, order=None, metadata=None, final_metadata=None):
    with StreamingWriter(path, specs(ts), metadata or {"m": "~" * 8}, direct=direct_io) as w:
        for name in order or ts:
            w.write(name, ts[name])
        if final_metadata:
            w.rewrite_metadata(final_metadata)
        used = w.direct_io
    return path.read_bytes(), used


def direct_supported(tmp_path) -> bool:
    try:
        fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("order", ["declared", "one out of order", "reversed"])
def test_direct_writes_give_the_bytes_of_ordinary_writes(tmp_path, order):
    ts = tensors()
    names = list(ts)
    if order == "one out of order":
        names = names[:3] + names[4:] + names[3:4]
    elif order == "reversed":
        names = names[::-1]
    expected, used = write(tmp_path / "plain.safetensors", ts, False, names)
    assert not used
    got, used = write(tmp_path / "direct.safetensors", ts, True, names)
    assert got == expected
    loaded = load_file(tmp_path / "direct.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in ts.items())
    if order == "declared" and direct_supported(tmp_path):
        assert used  # the whole file went out with O_DIRECT
    assert not list(tmp_path.glob("*.partial"))


def test_metadata_rewritten_after_direct_writes(tmp_path):
    ts = tensors()
    final = {"m": "12345678"}
    expected, _ = write(tmp_path / "plain.safetensors", ts, False, metadata=final)
    got, _ = write(tmp_path / "direct.safetensors", ts, True, final_metadata=final)
    assert got == expected


@pytest.fixture
def direct_fds(monkeypatch):
    """The descriptors opened with O_DIRECT (to make their writes fail)."""
    opened, real_open, real_close = set(), os.open, os.close

    def recording_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            opened.add(fd)
        return fd

    def recording_close(fd):
        opened.discard(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "close", recording_close)
    return opened


def failing_direct_writes(monkeypatch, fds, error: int, after: int = 0):
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        if fd in fds:
            calls.append(offset)
            if len(calls) > after:
                raise OSError(error, os.strerror(error))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("after", [0, 3])
def test_a_refused_direct_write_turns_into_ordinary_writes(tmp_path, monkeypatch, direct_fds,
                                                           after):
    if not direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    ts = tensors()
    expected, _ = write(tmp_path / "plain.safetensors", ts, False)
    failing_direct_writes(monkeypatch, direct_fds, errno.EINVAL, after)
    got, used = write(tmp_path / "direct.safetensors", ts, True)
    assert got == expected and not used


def test_a_failing_direct_write_leaves_no_file(tmp_path, monkeypatch, direct_fds):
    if not direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    ts = tensors()
    failing_direct_writes(monkeypatch, direct_fds, errno.ENOSPC, after=2)
    path = tmp_path / "full.safetensors"
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        write(path, ts, True)
    assert not path.exists() and not list(tmp_path.glob("*.partial"))


def test_an_interrupted_direct_write_leaves_no_file(tmp_path):
    ts = tensors()
    path = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt), \
            StreamingWriter(path, specs(ts), direct=True) as w:
        w.write("t00", ts["t00"])
        w.write("t01", ts["t01"])
        raise KeyboardInterrupt
    assert not path.exists() and not list(tmp_path.glob("*.partial"))


def test_small_files_are_written_the_ordinary_way(tmp_path):
    ts = tensors()
    with StreamingWriter(tmp_path / "s.safetensors", specs(ts)) as w:
        assert not w.direct_io  # 1 MB: below DIRECT_FROM_BYTES
        for name, t in ts.items():
            w.write(name, t)


# --- buffers written from where they are --------------------------------------------------------


def write_from_placed_buffers(path, ts, direct_io):
    """Each tensor's bytes copied into a page-aligned buffer at the offset within a block at
    which they go in the file (what `io.chunks` does when it reads), then written from there."""
    with StreamingWriter(path, specs(ts), {"m": "x"}, direct=direct_io) as w:
        for name, t in ts.items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            shift = w.file_offset(name) % direct.BLOCK
            buffer = mmap.mmap(-1, len(raw) + direct.BLOCK)
            view = memoryview(buffer)[shift:shift + len(raw)]
            view[:] = raw
            assert direct.address_of(view) % direct.BLOCK == w.file_offset(name) % direct.BLOCK
            w.write_part(name, 0, view)
            del view
        used = w.direct_io
    return path.read_bytes(), used


@pytest.fixture
def in_place_writes(monkeypatch):
    """Appends of 8 KiB and more may go out in place, from 16 KiB in two halves written at
    once; returns the byte counts written so."""
    monkeypatch.setattr(direct, "IN_PLACE_FROM_BYTES", 8 << 10)
    monkeypatch.setattr(direct, "SPLIT_FROM_BYTES", 8 << 10)
    sizes, real = [], direct.DirectAppender._write_in_place

    def counting(self, view):
        sizes.append(len(view))
        return real(self, view)

    monkeypatch.setattr(direct.DirectAppender, "_write_in_place", counting)
    return sizes


def test_placed_buffers_are_written_in_place_with_the_same_bytes(tmp_path, in_place_writes):
    ts = tensors()
    expected, _ = write(tmp_path / "plain.safetensors", ts, False, metadata={"m": "x"})
    got, used = write_from_placed_buffers(tmp_path / "direct.safetensors", ts, True)
    assert got == expected
    if direct_supported(tmp_path):
        assert used
        big = sum(t.numel() * t.element_size() for t in ts.values() if
                  t.numel() * t.element_size() >= 8 << 10)
        # all but the partial blocks at either end of each large tensor went out in place
        assert sum(in_place_writes) > big - 2 * direct.BLOCK * len(in_place_writes) > 0


@pytest.mark.parametrize("after", [0, 2])
def test_a_refused_in_place_write_turns_into_ordinary_writes(tmp_path, monkeypatch, direct_fds,
                                                             in_place_writes, after):
    if not direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    ts = tensors()
    expected, _ = write(tmp_path / "plain.safetensors", ts, False, metadata={"m": "x"})
    failing_direct_writes(monkeypatch, direct_fds, errno.EINVAL, after)
    got, used = write_from_placed_buffers(tmp_path / "direct.safetensors", ts, True)
    assert got == expected and not used and in_place_writes


def test_a_failing_in_place_write_leaves_no_file(tmp_path, monkeypatch, direct_fds,
                                                 in_place_writes):
    if not direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    failing_direct_writes(monkeypatch, direct_fds, errno.ENOSPC, after=4)
    path = tmp_path / "full.safetensors"
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        write_from_placed_buffers(path, tensors(), True)
    assert in_place_writes and not path.exists() and not list(tmp_path.glob("*.partial"))
