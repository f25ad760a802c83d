"""Prompt grids: the shipped ones, and errors that name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_sd.render.grids import GRIDS_DIR, GridError, load_grid, parse_grid

DAMAGE_KINDS = {"face", "hands", "text", "anatomy", "landscape", "anime", "photo",
                "architecture"}


def test_the_default_grid_covers_typical_merge_damage_with_two_seeds():
    grid = load_grid(None)
    assert {p.name for p in grid.prompts} >= DAMAGE_KINDS
    assert len(grid.prompts) >= 8 and len(grid.seeds) == 2
    assert any(p.negative for p in grid.prompts)
    assert grid.size_for("sd1") == (512, 512) and grid.size_for("sdxl") == (1024, 1024)


@pytest.mark.parametrize("path", sorted(GRIDS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_loads(path):
    grid = load_grid(path)
    assert grid.prompts and grid.seeds


def test_a_shipped_grid_is_found_by_name():
    assert load_grid("tiny").size == (64, 64)


def test_plain_string_prompts_get_numbered_names():
    grid = parse_grid("prompts: [a cat, a dog]\nseeds: [3]\n", "g.yaml")
    assert [(p.name, p.text, p.negative) for p in grid.prompts] == [
        ("p01", "a cat", None), ("p02", "a dog", None)]
    assert grid.size is None and grid.seeds == (3,)


def test_a_plain_prompt_never_takes_a_name_another_prompt_was_given():
    grid = parse_grid("prompts: [{name: p02, text: a red apple}, a blue car, p03]\n", "g.yaml")
    assert [p.name for p in grid.prompts] == ["p02", "p02-2", "p03"]
    grid = parse_grid("prompts: [{name: P02, text: a red apple}, a blue car]\n", "g.yaml")
    assert [p.name for p in grid.prompts] == ["P02", "p02-2"]  # one file on Windows/macOS


@pytest.mark.parametrize(("text", "expected"), [
    ("prompts:\n  - text: a cat\n    negativ: blurry\n",
     "g.yaml, line 3, prompts.0.negativ: is not a field here"),
    ("prompts: [a cat]\nsize: [500, 512]\n",
     "g.yaml, line 2, size: Value error, 500 must be a multiple of 64"),
    ("prompts: [a cat]\nseeds: [1, 1]\n",
     "g.yaml, line 2, seeds: lists seed 1 twice; give each seed once"),
    ("seeds: [1]\n", "g.yaml, line 1, prompts: is required but missing"),
    # said at the second name's line; names alike but for case are one file on Windows/macOS
    ("prompts:\n  - {text: a, name: x}\n  - {text: b, name: x}\n",
     "g.yaml, line 3, prompts.1.name: prompts.0 is named 'x' already"),
    ("prompts:\n  - {text: a, name: CON}\n  - b\n  - {text: c, name: con}\n",
     "g.yaml, line 4, prompts.2.name: prompts.0 is named 'CON' already (names that differ only "
     "in case name one file on Windows and macOS); give each prompt its own name"),
    # YAML's true is no number (it passed as seed 1)
    ("prompts: [a]\nseeds: [true]\n", "g.yaml, line 2, seeds: true and false are not "
     "numbers; give a list of whole numbers from 0 to 2**63 - 1, e.g. [1234, 98765]"),
    ("prompts: [a]\nsteps: true\n", "g.yaml, line 2, steps: true and false are not numbers"),
    ("prompts: [a]\nsize: [64, false]\n", "g.yaml, line 2, size: true and false are not"),
    # the project's wording, not pydantic's
    ("prompts: [a]\nversion: 2\n",
     "g.yaml, line 2, version: write version: 1 (the grid format this mergekit-sd reads)"),
    ("prompts: [a]\nseeds: [5, 1.5]\n", "g.yaml, line 2, seeds.1: give a list of whole "
     "numbers from 0 to 2**63 - 1, e.g. [1234, 98765]"),
    ("prompts: [a]\nsize: [64]\n", "g.yaml, line 2, size: give one side or [WIDTH, HEIGHT], "
     "in multiples of 64 up to 4096 pixels"),
    ("prompts:\n  - {text: a, name: 'a b'}\n", "g.yaml, line 2, prompts.0.name"),
    ("prompts: [a\n", "g.yaml, line 2: is not valid YAML"),
    ("prompts: ['']\n", "g.yaml, line 1, prompts.0: is empty; write the prompt's text"),
    ("prompts: [{text: ''}]\n", "g.yaml, line 1, prompts.0.text: is empty"),
    ("prompts: [a, yes, 12]\n", "g.yaml, line 1, prompts.1: write a prompt as text (in quotes "
                               "when it is yes, no or a number) or as a mapping with text:"),
    ("prompts: []\n", "g.yaml, line 1, prompts: give at least one prompt"),
    ("prompts: [a]\nguidance: .nan\n", "g.yaml, line 2, guidance: give a number from 0 to 30"),
    ("prompts: [a cat]\nseeds: [1\x07]\n",
     "g.yaml, line 2: is not valid YAML (special characters are not allowed)"),
])
def test_grid_errors_name_the_file_line_and_field(text, expected):
    with pytest.raises(GridError) as caught:
        parse_grid(text, "g.yaml")
    assert expected.replace("Value error, ", "") in str(caught.value)


@pytest.mark.parametrize("name", ["loop", "a" * 300])
def test_a_grid_path_that_cannot_be_opened_is_one_sentence(tmp_path, name):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(GridError, match="cannot be read .*; give a grid YAML file"):
        load_grid(tmp_path / name)


def test_a_missing_grid_lists_the_shipped_ones(tmp_path):
    with pytest.raises(GridError, match="does not exist; give a grid YAML file or one of "
                                        "default, tiny$"):
        load_grid(tmp_path / "nope.yaml")


def test_without_shipped_grids_the_advice_lists_no_empty_names(tmp_path, monkeypatch):
    from mergekit_sd.render import grids

    monkeypatch.setattr(grids, "GRIDS_DIR", tmp_path / "none-here")
    with pytest.raises(GridError) as caught:
        load_grid("tiny")
    assert str(caught.value) == "tiny: does not exist; give a grid YAML file"


def test_the_shipped_grids_are_package_data_a_wheel_installs():
    """An installed wheel holds the package and its package data, not the repository's other
    folders: the grids must lie in the package, matched by pyproject's package-data."""
    import fnmatch
    import tomllib

    from conftest import REPO

    import mergekit_sd

    package = Path(mergekit_sd.__file__).resolve().parent
    render = package / "render"
    assert GRIDS_DIR.is_relative_to(render)
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["mergekit_sd.render"]
    shipped = sorted(GRIDS_DIR.glob("*.yaml"))
    assert [p.stem for p in shipped] == ["default", "tiny"]
    for grid in shipped:
        relative = grid.relative_to(render).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
