"""io.buffers.page_buffer: the memory that chunks are read into and written out of."""

import sys

import pytest

from mergekit_sd.io.buffers import page_buffer
from mergekit_sd.io.direct import BLOCK, address_of


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
