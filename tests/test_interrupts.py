"""A second Ctrl-C during the clean-up after the first one still leaves no partial file."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from mergekit_sd.io.interrupts import interrupts_held
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
from mergekit_sd.lora.bake import LoraUse, prepare_bake
from mergekit_sd.lora.bake_run import BakeStream
from mergekit_sd.testing import write_checkpoint, write_lora


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT handled as Python handles it in a process started from a terminal. A process
    that a non-interactive shell starts in the background inherits SIGINT ignored, and Python
    keeps it so: there, Ctrl-C never reaches the code under test at all."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_an_interrupt_inside_is_held_until_the_block_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        signal.raise_signal(signal.SIGINT)
        done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_block_leaving_with_its_own_error_keeps_that_error():
    with pytest.raises(ValueError), interrupts_held():
        signal.raise_signal(signal.SIGINT)
        raise ValueError("the block's own")


def test_nothing_is_held_off_the_main_thread():
    seen = []

    def clean_up():
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=clean_up)
    worker.start()
    worker.join()
    assert seen == [signal.default_int_handler]


def test_a_second_ctrl_c_while_a_bake_stops_leaves_no_partial_file(tmp_path):
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", dtype="F16")
    lora = write_lora(tmp_path / "l.safetensors", "kohya-sdxl", rank=4)
    output = tmp_path / "out.safetensors"
    plan = prepare_bake(base, [LoraUse("l", lora, 0.6)], output)
    stream = BakeStream(plan)
    partial = stream._writer.partial
    assert partial.exists()
    join = stream._thread.join

    def impatient_join(*args):
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, while the copy is stopped
        join(*args)

    stream._thread.join = impatient_join
    with pytest.raises(KeyboardInterrupt):
        stream.abort()
    assert not partial.exists() and not output.exists()


def test_a_second_ctrl_c_while_a_writer_aborts_leaves_no_partial_file(tmp_path, monkeypatch):
    writer = StreamingWriter(tmp_path / "out.safetensors", [TensorSpec("a", "F32", (4,))])
    real_close = os.close

    def impatient_close(fd):
        signal.raise_signal(signal.SIGINT)
        real_close(fd)

    monkeypatch.setattr("mergekit_sd.io.writer.os.close", impatient_close)
    with pytest.raises(KeyboardInterrupt):
        writer.abort()
    monkeypatch.undo()
    assert not writer.partial.exists() and not writer.path.exists()
