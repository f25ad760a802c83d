"""io.mapped.MappedTensors: tensors viewing a copy-on-write mapping of a file, and handing
their memory back once a bake is done with them."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sd.io.direct import address_of
from mergekit_sd.io.header import read_header
from mergekit_sd.io.mapped import MappedTensors
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.lora.bake import LoraUse, plan_bake
from mergekit_sd.lora.bake_run import run_bake
from mergekit_sd.testing import write_checkpoint, write_lora

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")


def resident_kib(mapping: mmap.mmap) -> int:
    """The mapping's resident memory in KiB, from /proc/self/smaps."""
    start = address_of(memoryview(mapping))
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a region's first line
                low, high = (int(x, 16) for x in fields[0].split("-"))
                inside = low <= start < high
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    raise AssertionError("mapping not found in /proc/self/smaps")


@pytest.fixture
def three_tensors(tmp_path):
    path = tmp_path / "three.safetensors"
    tensors = {name: torch.arange(256 << 10, dtype=torch.float32) * i  # 1 MiB each
               for i, name in enumerate(("a", "b", "c"), start=1)}
    save_file(tensors, path)
    return path, tensors


@linux_only
def test_released_tensors_leave_the_process_and_still_read_back(three_tensors):
    path, expected = three_tensors
    with SafetensorsReader(path, read_header(path)) as reader:
        mapped = MappedTensors(reader)
    views = {key: mapped.tensor(key) for key in expected}
    mapped.populate(expected)
    before = resident_kib(mapped.mapping)
    assert before >= 3 * 1024
    mapped.release(["a", "b"])
    after = resident_kib(mapped.mapping)
    assert before - after >= 2 * 1024 - 8  # both tensors, but for the pages they share
    for key, tensor in expected.items():  # mapped again from the file when read
        assert torch.equal(views[key], tensor)


def test_a_bake_hands_back_every_lora_tensor_it_applied(tmp_path, monkeypatch):
    released: set[str] = set()
    release = MappedTensors.release

    def spy(self, keys):
        keys = list(keys)
        released.update(keys)
        release(self, keys)

    monkeypatch.setattr(MappedTensors, "release", spy)
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sd1")
    plan = plan_bake(base, [LoraUse("l", lora, 0.8)], tmp_path / "out.safetensors")
    run_bake(plan)
    applied = {key for apps in (*plan.weights.values(), *plan.biases.values())
               for app in apps for key in app.module.keys}
    assert applied and released == applied
    assert applied == set(read_header(lora).tensors) - set(plan.files[0].ignored)
