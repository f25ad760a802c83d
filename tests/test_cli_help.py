"""Every command's --help as users see it: plain text, no markup escapes."""

from __future__ import annotations

import click
import typer.main
from typer.testing import CliRunner

from mergekit_sd.cli import app


def _command_paths(command: click.Command, path: tuple[str, ...] = ()):
    """Every command and group under `command`, as the words that name it on the line."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _command_paths(command.get_command(ctx, name), (*path, name))


def test_help_of_every_command_shows_brackets_without_escapes():
    runner = CliRunner()
    paths = list(_command_paths(typer.main.get_command(app)))
    assert len(paths) > 30  # the lazy groups were walked too
    required_shown = 0
    for path, _command in paths:
        shown = runner.invoke(app, [*path, "--help"], terminal_width=100)
        assert shown.exit_code == 0, (path, shown.output)
        assert "\\[" not in shown.output, (path, shown.output)  # typer <0.20 escapes for rich
        required_shown += "[required]" in shown.output
    assert required_shown > 10


def test_bake_help_names_its_defaults_and_required_arguments():
    shown = CliRunner().invoke(app, ["bake", "--help"], terminal_width=100)
    assert "BASE      [required]" in shown.output
    assert "[default: keep]" in shown.output
