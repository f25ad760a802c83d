"""io.buffers: the memory that chunks are read into and written out of, and its pool."""

import sys
import threading
import time

import pytest

from mergekit_sd.io.buffers import HUGE_PAGE, BufferPool, page_buffer
from mergekit_sd.io.chunks import ChunkReader, plan_chunks
from mergekit_sd.io.direct import BLOCK, address_of
from mergekit_sd.io.header import read_header
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.testing import write_checkpoint


def test_page_buffer_is_zeroed_aligned_and_writable():
    buffer = page_buffer(3 * BLOCK + 5)
    view = memoryview(buffer)
    assert len(view) == 3 * BLOCK + 5
    assert address_of(view) % BLOCK == 0
    assert bytes(view[:64]) == bytes(64)
    view[-5:] = b"abcde"
    assert bytes(buffer[-5:]) == b"abcde"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_page_buffer_is_a_private_mapping():
    # a shared anonymous mapping (Python's default) stays on small pages
    buffer = page_buffer(4 << 20)
    start = address_of(memoryview(buffer))
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    perms = [fields[1] for fields in regions
             if int(fields[0].split("-")[0], 16) <= start < int(fields[0].split("-")[1], 16)]
    assert perms == ["rw-p"]


# --- BufferPool --------------------------------------------------------------------------------


def test_a_pool_makes_buffers_on_demand_and_hands_the_same_ones_back():
    stop = threading.Event()
    pool = BufferPool(2, 3 << 20)
    first, second = pool.take(1 << 20, stop), pool.take(1 << 20, stop)
    assert len(first) == len(second) == HUGE_PAGE * 2  # whole huge pages
    pool.give(first)
    pool.give(second)
    assert {id(pool.take(1 << 20, stop)), id(pool.take(1 << 20, stop))} == \
        {id(first), id(second)}


def test_a_buffer_too_small_is_replaced_by_a_larger_one_that_stays():
    stop = threading.Event()
    pool = BufferPool(1, 64 << 10)
    small = pool.take(10, stop)
    assert len(small) == 64 << 10  # small sizes are not rounded up
    pool.give(small)
    large = pool.take(5 << 20, stop)
    assert len(large) == 6 << 20
    pool.give(large)
    assert pool.take(10, stop) is large


def test_taking_from_an_empty_pool_waits_until_stopped():
    stop = threading.Event()
    pool = BufferPool(1, 4096)
    pool.take(4096, stop)
    threading.Timer(0.2, stop.set).start()
    assert pool.take(4096, stop) is None


def test_chunk_readers_sharing_a_pool_reuse_its_buffers(tmp_path):
    """A bake reads the file twice (the copy, then the bake): the second reader gets the first
    one's buffers, also those of chunks it read ahead and nobody took."""
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype="F16")
    header = read_header(path)
    order = sorted(header.tensors, key=lambda k: header.tensors[k].start)
    chunks = plan_chunks(header, order, set(), 16 << 10)
    pool, seen = BufferPool(3, 20 << 10), [set(), set()]
    with SafetensorsReader(path) as reader:
        with ChunkReader(reader, chunks[:5], pool=pool) as reading:
            first = next(iter(reading))  # and leave, the rest read ahead but never taken
            seen[0].add(id(first._buffer))
            reading.release(first)
            time.sleep(0.2)
        with ChunkReader(reader, chunks[5:], pool=pool) as reading:
            for chunk in reading:
                seen[1].add(id(chunk._buffer))
                reading.release(chunk)
    assert len(chunks) > 10 and len(seen[1]) == 3 and seen[0] <= seen[1]
