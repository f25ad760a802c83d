"""What every command shares: the name of the output option, and the sentence for an input
that is not there."""

from __future__ import annotations

import click
import pytest
import typer.main

from mergekit_sd.cli import app

# every command that writes a file or folder named by an option, and that option's parameter
WRITERS = {("merge",): "out", ("plan",): "out", ("render",): "out", ("compare",): "out",
           ("recipe", "extract"): "out", ("bake",): "output", ("lora", "merge"): "output",
           ("lora", "extract"): "output"}


def _command(path: tuple[str, ...]) -> click.Command:
    command = typer.main.get_command(app)
    for name in path:
        command = command.get_command(click.Context(command), name)
    return command


@pytest.mark.parametrize("path", list(WRITERS), ids=" ".join)
def test_every_writing_command_takes_dash_o_and_out(path):
    option = next(p for p in _command(path).params if p.name == WRITERS[path])
    assert {"-o", "--out"} <= set(option.opts), option.opts


def test_output_stays_an_alias_where_it_was_one():
    for path in (("bake",), ("lora", "merge"), ("lora", "extract")):
        option = next(p for p in _command(path).params if p.name == "output")
        assert "--output" in option.opts


def test_a_missing_input_is_said_alike_by_every_command(cli, tmp_path):
    missing = tmp_path / "gone.safetensors"
    out = tmp_path / "out.safetensors"
    runs = (("inspect", missing), ("convert", missing, out),
            ("bake", missing, missing, "-o", out),
            ("lora", "merge", missing, missing, "--out", out),
            ("lora", "extract", missing, missing, "--rank", "4", "-o", out),
            ("render", missing, "-o", tmp_path / "renders"))
    for args in runs:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: "), (args, done.stderr)
        assert f"{missing}: does not exist" in done.stderr, (args, done.stderr)
        assert "no such file" not in done.stderr, (args, done.stderr)
