"""The bake's arithmetic on several workers (lora.bake_crew): chunks handed on in the file's
order whatever order their tasks finish in, errors and cancels raised on the caller's thread,
and weights baked a block of rows at a time byte for byte like whole ones."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sd.errors import Cancelled
from mergekit_sd.io.chunks import Chunk, Piece
from mergekit_sd.lora import bake_run
from mergekit_sd.lora.bake import LoraUse, plan_bake
from mergekit_sd.lora.bake_crew import BakeCrew
from mergekit_sd.progress import CancelToken
from mergekit_sd.testing import write_checkpoint, write_lora


def chunks_of(*pieces_per_chunk: int, size: int = 4) -> list[Chunk]:
    """Chunks of `size`-byte pieces named "c{chunk}p{piece}", each chunk with its own bytes."""
    chunks = []
    for index, count in enumerate(pieces_per_chunk):
        pieces = [Piece(f"c{index}p{i}", 0, size, i * size) for i in range(count)]
        chunks.append(Chunk(index, 0, count * size, pieces,
                            view=memoryview(bytearray(b"%d" % index * (count * size)))))
    return chunks


class Record:
    """What the crew handed on and finished, in the order it did."""

    def __init__(self):
        self.handed: list[tuple[int, list]] = []
        self.finished: list[str] = []
        self.ticks = 0

    def hand_on(self, chunk: Chunk, results: list) -> None:
        self.handed.append((chunk.index, [bytes(r) if isinstance(r, memoryview) else r
                                          for r in results]))

    def tick(self) -> None:
        self.ticks += 1


def test_chunks_are_handed_on_in_order_when_a_later_one_finishes_first():
    chunks = chunks_of(1, 2, 1)
    first_may_finish = threading.Event()

    def slow() -> str:  # chunk 0's only task waits until chunk 1 is done
        assert first_may_finish.wait(10)
        return "slow"

    def tasks_of(chunk: Chunk):
        if chunk.index == 0:
            return [[slow]]
        if chunk.index == 1:  # a whole piece, then a piece in three parts (kept as read)
            return [[lambda: "whole"], [lambda: None, lambda: None, first_may_finish.set]]
        return [[]]  # nothing to do: handed on as read

    record = Record()
    with BakeCrew(2) as crew:
        crew.run(chunks, tasks_of, record.hand_on, record.finished.append, CancelToken(),
                 record.tick)
    assert record.handed == [(0, ["slow"]), (1, ["whole", b"1111"]), (2, [b"2222"])]
    # chunk 1's tensors were done while chunk 0 waited; each is finished once
    assert sorted(record.finished) == ["c0p0", "c1p0", "c1p1"]
    assert record.finished.index("c1p1") < record.finished.index("c0p0")
    assert crew.tensors_done == 3 and record.ticks >= 3


def test_a_failing_task_is_raised_by_run_and_stops_the_chunks_after_it():
    chunks = chunks_of(1, 1, 1, 1, 1)

    def fail():
        raise OSError("disk on fire")

    record = Record()
    with pytest.raises(OSError, match="disk on fire"), BakeCrew(2, ahead=1) as crew:
        crew.run(chunks, lambda c: [[fail if c.index == 1 else lambda: "ok"]],
                 record.hand_on, record.finished.append, CancelToken(), record.tick)
    assert [index for index, _ in record.handed] == [0]


def test_a_failing_setup_is_raised_rather_than_waited_for():
    def setup():
        raise RuntimeError("no torch here")

    with pytest.raises(RuntimeError, match="no torch here"), BakeCrew(1, setup) as crew:
        crew.run(chunks_of(1), lambda c: [[lambda: "ok"]], Record().hand_on, print,
                 CancelToken(), lambda: None)


def test_a_cancel_from_a_progress_tick_stops_the_run():
    token, record = CancelToken(), Record()

    def tick():
        record.tick()
        if record.ticks == 2:
            token.cancel()

    with pytest.raises(Cancelled), BakeCrew(2, ahead=1) as crew:
        crew.run(chunks_of(*[1] * 20), lambda c: [[lambda: "ok"]], record.hand_on,
                 record.finished.append, token, tick)
    assert record.ticks == 2 and len(record.handed) < 20


# --- weights baked in blocks of rows -------------------------------------------------------------


@pytest.mark.parametrize(("variant", "fmt", "dtype"), [
    ("sdxl", "kohya-sdxl", "F16"),  # in place in fp16: one module per weight
    ("sd1", "locon-sd1", "F32"),  # 3x3 convolutions, flattened
    ("flux-dev", "diffusers-flux", "F32"),  # q, k and v: three modules on rows of one qkv
])
def test_weights_baked_in_blocks_of_rows_match_whole_ones_on_any_number_of_cores(
        tmp_path, monkeypatch, variant, fmt, dtype):
    """Blocks of rows give the same bytes on one worker or three (the blocks do not depend on
    the cores). Against whole weights: the matrix kernel may sum a block's products in
    another order, so in fp16 a few elements may round the other way (one unit in the last
    place; none did on the full-size SDXL bench) and in fp32 the values agree up to fp32
    rounding."""
    base = write_checkpoint(tmp_path / "base.safetensors", variant, dtype=dtype)
    lora = write_lora(tmp_path / "l.safetensors", fmt, rank=8, dtype=dtype)

    def bake(name: str) -> dict[str, torch.Tensor]:
        plan = plan_bake(base, [LoraUse("l", lora, 0.7)], tmp_path / name)
        return load_file(bake_run.run_bake(plan))

    whole = bake("whole.safetensors")
    parts: list[int] = []
    tasks = bake_run._Baker.tasks

    def counted(self, key, info, raw):
        found = tasks(self, key, info, raw)
        parts.append(len(found))
        return found

    monkeypatch.setattr(bake_run._Baker, "tasks", counted)
    monkeypatch.setattr(bake_run, "ROW_BLOCK_ELEMENTS", 37)  # blocks of a row or a few
    monkeypatch.setattr(bake_run, "cores", lambda: 3)
    on_three = bake("three.safetensors")
    assert max(parts) > 3  # weights were really cut up
    monkeypatch.setattr(bake_run, "cores", lambda: 1)
    on_one = bake("one.safetensors")
    assert whole.keys() == on_three.keys() == on_one.keys()
    differing = elements = 0
    for key, value in whole.items():
        assert torch.equal(on_three[key], on_one[key]), key
        got, want = on_three[key].float(), value.float()
        if dtype == "F16":  # a rounding tie may go the other way: one unit in the last place
            ulp = (torch.finfo(torch.float16).eps * torch.maximum(got.abs(), want.abs())
                   ).clamp_min(2.0 ** -24)  # fp16's subnormal step
            assert ((got - want).abs() <= ulp).all(), key
            differing += int((got != want).sum())
            elements += got.numel()
        else:
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 1e-6 * scale, key
    assert differing <= elements * 1e-3
