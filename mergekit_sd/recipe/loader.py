"""Load a recipe file: `yaml.safe_load`, pydantic validation, errors that name file, field, line."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from mergekit_sd.errors import UserError
from mergekit_sd.recipe.schema import Recipe
from mergekit_sd.yaml_lines import YamlFileError, dotted, line_of, load_mapping


class RecipeError(YamlFileError):
    """A recipe problem: one sentence with the file, the line and the field."""


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path  # the recipe file; relative model paths resolve against its folder
    lines: dict[tuple, int] = field(default_factory=dict)
    # field path of a parameter a `--set` gave -> that `--set` argument as typed
    overrides: dict[tuple, str] = field(default_factory=dict)

    def error(self, field_path: tuple, problem: str) -> UserError:
        """A RecipeError for `field_path` (e.g. ("steps", 0, "params", "alpha")), or, when a
        `--set` gave that value, an error naming the `--set`: the file has no such line."""
        for at, assignment in self.overrides.items():
            if tuple(field_path[:len(at)]) == at:
                inner = dotted(field_path[len(at):])
                return UserError(f"--set {assignment!r}: {inner + ': ' if inner else ''}{problem}")
        return RecipeError(self.path, line_of(self.lines, field_path), dotted(field_path),
                           problem)


_LEADING_PATH = re.compile(r"^(?:Value error, )?([A-Za-z_][\w]*(?:\.[\w-]+)*): (.*)$", re.S)


def parse_recipe(text: str, path: Path | str = "<recipe>", out: Path | None = None
                 ) -> LoadedRecipe:
    """`out`: the file `plan`/`merge --out` names, which stands in for a missing `output:`
    (its other fields keep their defaults; --out itself decides where the file goes)."""
    path = Path(path)
    data, lines = load_mapping(text, path, RecipeError, "models, steps and output")
    if out is not None and "output" not in data:
        data = {**data, "output": {"path": str(out)}}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, path, lines) from None
    return LoadedRecipe(recipe, path, lines)


def _first_error(exc: ValidationError, path: Path, lines: dict) -> RecipeError:
    loc, message = describe_validation_error(exc)
    return RecipeError(path, line_of(lines, loc), dotted(loc), message)


def describe_validation_error(exc: ValidationError, prefix: tuple = ()) -> tuple[tuple, str]:
    """(field location, one sentence) for the error that explains `exc` best; `prefix` is
    where the validated value sits in a recipe (a `--set` value: its step and param)."""
    errors = exc.errors()
    first = _user_loc(errors[0])
    # pydantic reports each member of a union it tried; the one that got deepest into the
    # value (a ModelRef's unknown field, not "should be a string") says what is wrong
    error = max((e for e in errors if _user_loc(e)[:len(first)] == first),
                key=lambda e: len(_user_loc(e)))
    loc = (*prefix, *_user_loc(error))
    message = error["msg"]
    if loc == prefix:  # cross-field rules name their field at the start of the message
        match = _LEADING_PATH.match(message)
        if match:
            loc = (*prefix, *(int(p) if p.isdigit() else p for p in match[1].split(".")))
            message = match[2]
    message = message.removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = f"is not a field here ({_known_fields_hint(loc)})"
    elif error["type"] == "missing":
        message = "is required but missing"
        if loc == ("output",):  # plan and merge can take the file from the command line
            message += " (give output: with its path, or pass --out FILE to plan or merge)"
    elif isinstance(error["input"], list) and error["type"] in _ONE_VALUE_TYPES:
        message = (f"a sweep (a list of values) is only possible on a parameter or its "
                   f"default, not on {_swept_field(loc)}; give one value")
    elif error["type"] == "string_type" and isinstance(error["input"], dt.date):
        message = (f"YAML reads {error['input'].isoformat()} as a date, not text; put it in "
                   f"quotes: '{error['input'].isoformat()}'")
    return loc, message


# pydantic's types of error for a list where one value belongs ("Input should be a valid number")
_ONE_VALUE_TYPES = {"float_type", "int_type", "bool_type", "string_type"}


def _swept_field(loc: tuple) -> str:
    """What a list was given for, as a user names it."""
    for part, what in (("loras", f"a LoRA's {loc[-1]}"), ("blocks", "a block's value"),
                       ("components", "a component's value"), ("keys", "a key pattern's value")):
        if part in loc:
            return what
    if "params" in loc:  # a list inside a sweep
        return "a value inside a sweep"
    return dotted(loc)


def _user_loc(error: dict) -> tuple:
    return tuple(part for part in error["loc"] if not _is_union_tag(part))


def _is_union_tag(part) -> bool:
    # pydantic inserts the union member it tried into the location; users never wrote those
    return isinstance(part, str) and (part in {"str", "float", "int", "bool", "ParamSpec",
                                               "ModelRef", "scalar", "sweep", "spec",
                                               "block-map", "block-list", "block-text"}
                                      or part.startswith(("list[", "dict[", "union[",
                                                          "function-", "constrained-")))


def _known_fields_hint(loc: tuple) -> str:
    from mergekit_sd.recipe.schema import LoraSpec, ModelRef, Output, ParamSpec, Step

    parent = loc[:-1]
    model = {(): Recipe, ("output",): Output}.get(parent)
    if model is None and len(parent) == 2 and parent[0] == "steps":
        model = Step
    if model is None and len(parent) == 4 and parent[2] == "params":
        model = ParamSpec
    if model is None and len(parent) == 4 and parent[2] == "loras":
        model = LoraSpec
    if model is None and len(parent) == 2 and parent[0] == "models":
        model = ModelRef
    if model is None:
        return "unknown field"
    import difflib

    fields = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid fields: {', '.join(fields)}"


def load_recipe(path: str | Path, out: Path | None = None) -> LoadedRecipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(path, None, "", "does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise RecipeError(path, None, "", "is not a YAML text file") from None
    return parse_recipe(text, path, out)
