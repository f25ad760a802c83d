"""`plan`, `inspect` and `blocks` into a pipe or a file: paths, names and metadata stay on one
line each (rich alone lays output out for 80 columns there, and `inspect ... | grep` got a
path cut in two); in a terminal the tables still fit its width."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO, run_piped
from terminal import run_on_terminal

from mergekit_sd.testing import write_checkpoint

LONG_TITLE = "A title longer than a line of eighty columns, " * 3


@pytest.fixture(scope="module")
def long_paths(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints whose paths are well over 80 columns, and a recipe merging them."""
    folder = tmp_path_factory.mktemp("models") / ("a-folder-whose-name-is-long-" * 3)
    name = "a-checkpoint-whose-file-name-alone-is-longer-than-a-terminal-of-eighty-columns"
    paths = {"a": write_checkpoint(folder / f"{name}.safetensors", "sd1", seed=1,
                                   metadata={"modelspec.title": LONG_TITLE}),
             "b": write_checkpoint(folder / "b.safetensors", "sd1", seed=2),
             "out": folder / "a-merged-output-whose-name-is-long-too.safetensors"}
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodels:\n  a: {paths['a']}\n  b: {paths['b']}\nsteps:\n"
                      "  - {name: mix, method: weighted_sum, inputs: [a, b], "
                      "params: {alpha: 0.5}}\n"
                      f"output:\n  path: {paths['out']}\n")
    return {**paths, "recipe": recipe}


def lines_of(*args) -> list[str]:
    done = run_piped(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def whole(text: str, lines: list[str]) -> bool:
    return any(text in line for line in lines)


def test_plan_keeps_paths_whole_in_a_pipe(long_paths):
    lines = lines_of("plan", long_paths["recipe"])
    for key in ("a", "b"):
        assert whole(str(long_paths[key]), lines), lines
    assert whole(f"output mix -> {long_paths['out']} (", lines), lines
    keys = next(line for line in lines if line.startswith("keys: "))
    assert " OUT11:" in keys, lines  # every block's count on the one line


def test_inspect_keeps_paths_names_and_metadata_whole_in_a_pipe(long_paths):
    lines = lines_of("inspect", long_paths["a"])
    assert whole(long_paths["a"].name, lines), lines  # the summary's file column
    assert whole(f" {long_paths['a']} ", lines), lines  # the rule over the details
    assert whole(LONG_TITLE.strip(), lines), lines
    # the rule is drawn as wide as its path needs, not as wide as an unlimited line
    assert max(map(len, lines)) < len(str(long_paths["a"])) + 200


def test_blocks_of_a_file_keeps_its_path_whole_in_a_pipe(long_paths):
    lines = lines_of("blocks", long_paths["b"])
    assert lines[0] == f"SD1.x blocks (key counts in {long_paths['b']})", lines


def test_plan_tables_fit_a_terminal_and_its_messages_are_not_broken(long_paths):
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "TERM": "xterm"}
    code, _, shown = run_on_terminal(["plan", long_paths["recipe"]], env)
    assert code == 0, shown
    lines = shown.splitlines()
    assert all(len(line) <= 80 for line in lines if line[:1] in "┏┃┡│└"), shown
    # the terminal wraps this line for the eye; copied out, the path in it is whole
    assert whole(f"output mix -> {long_paths['out']} (", lines), shown
