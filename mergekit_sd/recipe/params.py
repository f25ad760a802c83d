"""Parameter values per key: scalars, per-block / per-component / per-key-pattern maps, sweeps.

Precedence for one key, most specific first: `keys` (the first pattern, in file order, that
matches the full key name) > `components` > `blocks` > `default` > the method's own default.
Key patterns are globs (`*attn2*`), or regular expressions when written `re:PATTERN`.
Block names are the architecture's (`mergekit-sd blocks ARCH`); `IN00-IN05` is a range.
`blocks` may also give one value per block in order (a list, or supermerger's comma-separated
string) or a preset (`arch.block_lists`, shared with `bake_lora`): blocks a short form leaves
out take the `default`.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from mergekit_sd.arch.architectures import Architecture, block_range
from mergekit_sd.arch.block_lists import BadBlockList, NotABlockList, listed_blocks
from mergekit_sd.arch.components import recipe_components
from mergekit_sd.recipe.schema import BLOCK_FORMS, ParamSpec, Recipe, Scalar

MakeError = Callable[[tuple, str], Exception]


def expand_blocks(name: str, arch: Architecture) -> list[str]:
    """`IN03` -> [IN03]; `IN00-IN05` -> IN00..IN05; raises ValueError for unknown names."""
    if name in arch.blocks:
        return [name]
    names = block_range(name)
    if names:
        missing = [n for n in names if n not in arch.blocks]
        if not missing:
            return names
        name = missing[0]
    import difflib

    close = difflib.get_close_matches(name, arch.blocks, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"block {name!r} does not exist for {arch.label} ({hint}its blocks are "
                     f"{arch.blocks[0]}, {arch.blocks[1]} … {arch.blocks[-1]}; see "
                     f"`mergekit-sd blocks {arch.id}`)")


def _compile_pattern(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class KeyedValue:
    """One parameter, resolved against an architecture, answering a value per key."""

    default: Scalar | None
    by_block: dict[str, Scalar]
    by_slot: dict[str, Scalar]
    by_pattern: tuple[tuple[str, re.Pattern, Scalar], ...]  # (as written, compiled, value)
    # (field, name as written, the blocks or slots it names), so that the plan can say which
    # of them select no key of the inputs: their values would otherwise vanish unsaid
    selectors: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def is_constant(self) -> bool:
        return not (self.by_block or self.by_slot or self.by_pattern)

    def value(self, key: str, slot: str, block: str) -> Scalar | None:
        for _, pattern, value in self.by_pattern:
            if pattern.fullmatch(key):
                return value
        if slot in self.by_slot:
            return self.by_slot[slot]
        return self.by_block.get(block, self.default)


def resolve_param(value: Scalar | ParamSpec, arch: Architecture, loc: tuple,
                  error: MakeError) -> KeyedValue:
    """Check a (non-sweep) parameter value against the architecture and make it answer per key."""
    if not isinstance(value, ParamSpec):
        return KeyedValue(value, {}, {}, ())
    selectors = []
    by_block: dict[str, Scalar] = {}
    if not isinstance(value.blocks, dict):  # one value per block, or a preset
        try:
            by_block.update(listed_blocks(value.blocks, arch))
        except NotABlockList:
            try:
                expand_blocks(value.blocks.strip(), arch)
            except ValueError:
                why = f"{value.blocks!r} is none of the forms blocks takes; {BLOCK_FORMS}"
            else:
                why = (f"{value.blocks!r} names blocks but gives them no value; write "
                       f"{{{value.blocks.strip()}: VALUE}}")
            raise error((*loc, "blocks"), why) from None
        except BadBlockList as exc:
            raise error((*loc, "blocks"), str(exc)) from None
    for name, v in (value.blocks.items() if isinstance(value.blocks, dict) else ()):
        try:
            blocks = expand_blocks(name, arch)
        except ValueError as exc:
            raise error((*loc, "blocks", name), str(exc)) from None
        for block in blocks:
            by_block[block] = v
        selectors.append(("blocks", name, tuple(blocks)))
    groups, valid = recipe_components(arch.id, arch.family)
    by_slot: dict[str, Scalar] = {}
    for name, v in value.components.items():
        slots = groups.get(name)
        if slots is None:
            raise error((*loc, "components", name),
                        f"{arch.label} has no component {name!r}; use one of {valid}")
        for slot in slots:
            by_slot[slot] = v
        selectors.append(("components", name, slots))
    patterns = []
    for pattern, v in value.keys.items():
        try:
            patterns.append((pattern, _compile_pattern(pattern), v))
        except re.error as exc:
            raise error((*loc, "keys", pattern), f"is not a valid regular expression ({exc})"
                        ) from None
        selectors.append(("keys", pattern, ()))
    default = value.default
    return KeyedValue(default, by_block, by_slot, tuple(patterns), tuple(selectors))


@dataclass(frozen=True)
class SweepAxis:
    step: str
    param: str
    values: tuple[Scalar, ...]


def sweep_axes(recipe: Recipe) -> list[SweepAxis]:
    """Every parameter given as a list (or whose `default` is a list) of a step the output
    uses is swept (a sweep of an unused step would name identical files after it)."""
    axes = []
    for step in recipe.needed_steps:
        for name, value in step.params.items():
            values = value.default if isinstance(value, ParamSpec) else value
            if isinstance(values, list):
                axes.append(SweepAxis(step.name, name, tuple(values)))
    return axes


def _fmt(value: Scalar) -> str:
    """A value as candidate names show it: short (%g), unless that would lose precision and
    so give two values one name (and one file)."""
    if not isinstance(value, float):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def check_sweeps(recipe: Recipe, error: MakeError) -> None:
    """Every sweep has values, each naming its own candidate (the name names its file)."""
    steps = [s.name for s in recipe.steps]
    for axis in sweep_axes(recipe):
        loc = ("steps", steps.index(axis.step), "params", axis.param)
        if not axis.values:
            raise error(loc, "a sweep needs at least one value")
        named: dict[str, Scalar] = {}
        for value in axis.values:
            name = _fmt(value)
            if name in named:
                raise error(loc, f"the sweep values {named[name]!r} and {value!r} give one "
                                 f"candidate ({axis.param}={name}); list each value once")
            named[name] = value


@dataclass(frozen=True)
class Candidate:
    """One output of a recipe: its name and the value each swept parameter takes in it."""

    name: str
    choice: tuple[tuple[str, str, Scalar], ...]  # (step, param, value)

    def value_of(self, step: str, param: str, given):
        """The parameter as given in the recipe, with a swept list replaced by this choice."""
        for s, p, v in self.choice:
            if (s, p) == (step, param):
                if isinstance(given, ParamSpec):
                    return given.model_copy(update={"default": v})
                return v
        return given


def candidates(recipe: Recipe) -> list[Candidate]:
    """One candidate per combination of swept values, named like `mix@alpha=0.3`."""
    axes = sweep_axes(recipe)
    final = recipe.final_step.name
    if not axes:
        return [Candidate(final, ())]
    result = []
    for combo in itertools.product(*(a.values for a in axes)):
        choice = tuple((a.step, a.param, v) for a, v in zip(axes, combo, strict=True))
        result.append(Candidate(candidate_name(final, choice), choice))
    return result


def candidate_name(final: str, values: tuple[tuple[str, str, object], ...]) -> str:
    """`mix@alpha=0.3` for values of one step, `final@a.alpha=0.3,b.beta=2` for several
    steps', the final step's name alone for none. Values other than scalars (a --set mapping)
    are given as their text."""
    if not values:
        return final
    one_step = len({step for step, _, _ in values}) == 1
    parts = [(param if one_step else f"{step}.{param}") + f"={_fmt(value)}"
             for step, param, value in values]
    return f"{values[0][0] if one_step else final}@{','.join(parts)}"
