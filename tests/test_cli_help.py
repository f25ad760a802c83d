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
    assert "Checkpoint to bake into (path or catalog ref).  [required]" in shown.output
    assert "[default: keep]" in shown.output


def test_every_arguments_help_is_shown():
    """click 8.5 took over an argument's help and dropped the one typer <0.20 gives it, so
    every `Arguments:` section said only `[required]` (click is held below 8.5 for this)."""
    runner = CliRunner()
    checked = 0
    for path, command in _command_paths(typer.main.get_command(app)):
        arguments = [p for p in command.params
                     if isinstance(p, click.Argument) and getattr(p, "help", None)]
        if not arguments:
            continue
        shown = " ".join(runner.invoke(app, [*path, "--help"], terminal_width=100)
                         .output.split())
        for argument in arguments:
            assert " ".join(argument.help.split())[:40] in shown, (path, argument.name)
            checked += 1
    assert checked > 20


def test_version_prints_the_package_version(cli):
    from mergekit_sd import __version__

    shown = cli("--version")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"mergekit-sd {__version__}\n"


def test_dash_h_is_help_on_the_root_and_on_commands_of_every_kind():
    runner = CliRunner()
    for path in ([], ["merge"], ["bake"], ["lora", "extract"], ["catalog", "list"], ["render"]):
        shown = runner.invoke(app, [*path, "-h"], terminal_width=100)
        assert shown.exit_code == 0, (path, shown.output)
        assert shown.output.startswith("Usage: "), (path, shown.output)
        assert "-h, --help" in shown.output, (path, shown.output)
