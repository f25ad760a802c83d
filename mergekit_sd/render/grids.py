"""Prompt grids: YAML files of prompts (with optional negatives), seeds, size, steps and guidance.

Read with `yaml.safe_load`, validated by pydantic models that mirror the file; errors name the
file, the line and the field, as recipe errors do. The shipped ones (`default`, `tiny`) are
package data in `prompt_grids/`, so that an installed wheel has them too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_sd.yaml_lines import YamlFileError, dotted, line_of, load_mapping

GRIDS_DIR = Path(__file__).resolve().parent / "prompt_grids"  # package data: see pyproject
DEFAULT_GRID = GRIDS_DIR / "default.yaml"
MAX_SIDE = 4096
MAX_GUIDANCE = 30
SIZE_STEP = 64  # every UNet and transformer here accepts multiples of 64 pixels
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class GridError(YamlFileError):
    """A grid problem: one sentence with the file, the line and the field."""


class GridPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    negative: str | None = None
    name: str | None = None  # short name for sheets and file names (default: p01, p02 ...)

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("use letters, digits, - and _ only (it names files)")
        return value


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str | None = None
    prompts: list[GridPrompt | Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    seeds: list[int] = Field(default=[1234], min_length=1)
    size: tuple[int, int] | int | None = None  # None: the model's own (512 SD1, 1024 others)
    steps: int = Field(default=25, ge=1, le=200)
    guidance: float = Field(default=6.0, ge=0, le=MAX_GUIDANCE)

    @field_validator("version", "seeds", "size", "steps", "guidance", mode="before")
    @classmethod
    def _no_booleans(cls, value, info):
        """YAML's true and false would pass as 1 and 0 (`seeds: [true]` drew seed 1)."""
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in items):
            raise ValueError("true and false are not numbers; " + _FIELD_ADVICE[(info.field_name,)])
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds: list[int]) -> list[int]:
        for seed in seeds:
            if not 0 <= seed < 2**63:
                raise ValueError(f"seed {seed} is out of range; {_FIELD_ADVICE[('seeds',)]}")
        for seed in seeds:
            if seeds.count(seed) > 1:
                raise ValueError(f"lists seed {seed} twice; give each seed once")
        return seeds

    @field_validator("size")
    @classmethod
    def _size_fits(cls, size):
        sides = (size, size) if isinstance(size, int) else size
        if sides is not None:
            for side in sides:
                if side <= 0 or side > MAX_SIDE or side % SIZE_STEP:
                    raise ValueError(f"{side} must be a multiple of {SIZE_STEP} up to "
                                     f"{MAX_SIDE} pixels")
        return size



@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    negative: str | None


@dataclass(frozen=True)
class LoadedGrid:
    path: Path
    name: str
    prompts: tuple[Prompt, ...]
    seeds: tuple[int, ...]
    size: tuple[int, int] | None  # (width, height); None: the model's own
    steps: int
    guidance: float

    def size_for(self, family: str) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        side = 512 if family == "sd1" else 1024
        return side, side


def _name_clash(grid: Grid) -> tuple[int, int] | None:
    """(index, index of the earlier one) of the first prompt whose name another has already,
    compared case-folded: names key image files, and `CON` and `con` are one file on Windows
    and macOS."""
    seen: dict[str, int] = {}
    for index, item in enumerate(grid.prompts):
        if isinstance(item, GridPrompt) and item.name:
            if item.name.casefold() in seen:
                return index, seen[item.name.casefold()]
            seen[item.name.casefold()] = index
    return None


def _default_name(number: int, taken: set[str]) -> str:
    """`pNN` for the prompt's position, with a suffix while an explicit name has it (in any
    case): names key image files and the conditioning cache, so two prompts must never share
    one."""
    name, suffix = f"p{number:02d}", 1
    while name.casefold() in taken:
        suffix += 1
        name = f"p{number:02d}-{suffix}"
    return name


def _loaded(grid: Grid, path: Path) -> LoadedGrid:
    taken = {p.name.casefold() for p in grid.prompts if isinstance(p, GridPrompt) and p.name}
    prompts = []
    for i, item in enumerate(grid.prompts, 1):
        item = GridPrompt(text=item) if isinstance(item, str) else item
        name = item.name or _default_name(i, taken)
        taken.add(name.casefold())
        prompts.append(Prompt(name, item.text, item.negative or None))
    size = (grid.size, grid.size) if isinstance(grid.size, int) else grid.size
    return LoadedGrid(path, grid.name or path.stem, tuple(prompts), tuple(grid.seeds),
                      tuple(size) if size else None, grid.steps, grid.guidance)


# What to write instead, for fields whose pydantic message would state a bound NaN breaks
# ("less than or equal to 30" for .nan) or name no limit at all
_FIELD_ADVICE = {
    ("version",): "write version: 1 (the grid format this mergekit-sd reads)",
    ("prompts",): "give at least one prompt",
    ("seeds",): "give a list of whole numbers from 0 to 2**63 - 1, e.g. [1234, 98765]",
    ("size",): f"give one side or [WIDTH, HEIGHT], in multiples of {SIZE_STEP} up to "
               f"{MAX_SIDE} pixels, e.g. [832, 1216]",
    ("steps",): "give a whole number of steps from 1 to 200",
    ("guidance",): f"give a number from 0 to {MAX_GUIDANCE}",
}
# Fields whose every problem below the field itself (a seed, one side of a size) gets the
# field's advice: pydantic's wording ("got a number with a fractional part") is not ours.
_ADVISED = ("version", "seeds", "size", "steps", "guidance")
_PROMPT_ADVICE = ("write a prompt as text (in quotes when it is yes, no or a number) or as a "
                  "mapping with text:")


def _user_loc(loc: tuple) -> tuple:
    """The error's place as the file spells it: without pydantic's union and type tags."""
    return tuple(p for p in loc if not (isinstance(p, str) and (
        p in ("GridPrompt", "str", "int", "constrained-str")
        or p.startswith(("tuple[", "function-")))))


def _message(errors: list[dict], loc: tuple) -> str:
    """The sentence for the first error at `loc`: pydantic's own for validators of ours, and
    plain advice instead of its class names and bounds."""
    error = errors[0]
    if error["type"] != "value_error" and loc and loc[0] in _ADVISED:
        return _FIELD_ADVICE[loc[:1]]
    if error["type"] == "extra_forbidden":
        return "is not a field here (valid: " + ", ".join(
            GridPrompt.model_fields if "prompts" in loc else Grid.model_fields) + ")"
    if error["type"] == "missing":
        return "is required but missing"
    if error["type"] == "string_too_short":
        return "is empty; write the prompt's text"
    if len(loc) == 2 and loc[0] == "prompts":  # an item matching neither text nor a mapping
        here = [e for e in errors if _user_loc(e["loc"]) == loc]
        if any(e["type"] == "string_too_short" for e in here):
            return "is empty; write the prompt's text"
        return _PROMPT_ADVICE
    if error["type"] != "value_error" and loc in _FIELD_ADVICE:
        return _FIELD_ADVICE[loc]
    return error["msg"].removeprefix("Value error, ")


def _place(errors: list[dict]) -> tuple:
    """Where the first error is, as the file spells it; within a size, the size itself (its
    sides have no line of their own in `size: [64]`)."""
    loc = _user_loc(errors[0]["loc"])
    return loc[:1] if loc[:1] == ("size",) else loc


def parse_grid(text: str, path: Path | str = "<grid>") -> LoadedGrid:
    path = Path(path)
    data, lines = load_mapping(text, path, GridError, "prompts and seeds")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        loc = _place(errors)
        raise GridError(path, line_of(lines, loc), dotted(loc), _message(errors, loc)) from None
    clash = _name_clash(grid)
    if clash is not None:  # said at the second name's own line
        index, first = clash
        loc = ("prompts", index, "name")
        raise GridError(path, line_of(lines, loc), dotted(loc),
                        f"prompts.{first} is named {grid.prompts[first].name!r} already (names "
                        "that differ only in case name one file on Windows and macOS); give "
                        "each prompt its own name")
    return _loaded(grid, path)


def load_grid(path: str | Path | None) -> LoadedGrid:
    """A grid file; a bare name (`default`, `tiny`) means a shipped one, GRIDS_DIR/NAME.yaml."""
    path = DEFAULT_GRID if path is None else Path(path)
    shipped = GRIDS_DIR / f"{path}.yaml"
    try:
        if path.suffix == "" and not path.exists() and shipped.exists():
            path = shipped
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GridError(path, None, "", "does not exist; " + _grid_advice()) from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise GridError(path, None, "", "is not a YAML text file") from None
    except OSError as exc:  # a symlink loop, a name too long, no permission
        raise GridError(path, None, "", f"cannot be read ({exc.strerror or exc}); give a "
                        "grid YAML file") from None
    return parse_grid(text, path)


def _grid_advice() -> str:
    """What to give instead: the shipped grids by name, when there are any (an install that
    lost its package data must not answer "one of " and nothing)."""
    names = sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))
    return "give a grid YAML file" + (f" or one of {', '.join(names)}" if names else "")
