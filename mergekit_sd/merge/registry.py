"""The merge-method registry: typed parameters, the `merge_method` decorator, name look-up.

A merge method is a plain function of same-shaped float32 tensors (one per model input) and
keyword-only parameters. `@merge_method("name", inputs=(...))` reads the parameters from the
signature (annotation = type, default = default) and records the method in `METHODS`. Recipes
name methods and parameters as strings, so `get_method` and `check_params` turn typos into one
sentence that names the nearest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergekit_sd.errors import UserError

# Keywords the executor supplies itself; they are never recipe parameters.
SUPPLIED_BY_EXECUTOR = ("generator", "stats")
PARAM_KINDS = (float, int, bool, str)
SPACES = ("weight", "delta")


class UnknownMethod(UserError):
    """A recipe names a merge method that is not registered."""

    def __init__(self, name: str, suggestions: list[str], known: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f"did you mean {_either(suggestions)}? Known" if suggestions else "known"
        super().__init__(f"unknown merge method {name!r}; {hint}: {', '.join(known)}.")


class BadParam(UserError):
    """A recipe gives a merge method a parameter it does not take, or a value it cannot use."""


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a merge method, as a recipe may set it."""

    name: str
    default: float | int | str | bool | None
    kind: type
    minimum: float | None = None
    maximum: float | None = None
    doc: str = ""
    min_exclusive: bool = False  # (minimum, ...) rather than [minimum, ...]
    max_exclusive: bool = False

    def range_text(self) -> str:
        """The allowed range in interval notation, e.g. "(0, 1]" or "[0, inf)"; "" when the
        parameter is not a number."""
        if self.kind not in (int, float):
            return ""
        low = "-inf" if self.minimum is None else _number(self.minimum)
        high = "inf" if self.maximum is None else _number(self.maximum)
        left = "(" if self.minimum is None or self.min_exclusive else "["
        right = ")" if self.maximum is None or self.max_exclusive else "]"
        return f"{left}{low}, {high}{right}"


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: call `func(*tensors, **params)` (plus `generator=` when
    `stochastic`, `stats=` when `needs_stats`)."""

    name: str
    func: Callable
    inputs: tuple[str, ...]  # model inputs in order; variadic methods take more after these
    variadic: bool
    params: dict[str, Param]
    stochastic: bool  # takes `generator=`; its `seed` param is recorded for reproduction
    space: str  # "weight" or "delta": what the inputs and the result are
    formula: str  # first line of the docstring
    needs_stats: str | None  # name of a whole-model pre-pass the executor runs first
    # True when each output element depends only on the same element of the inputs: the
    # executor may then stream large tensors through the method in pieces
    elementwise: bool = False
    # stochastic: the parameters that shape its random draws (the seed first), recorded with
    # the values used even when left at their defaults, so that a recipe keeps its draws
    # when a default changes; `drawn_when` names a bool parameter that switches draws on
    draws: tuple[str, ...] = ()
    drawn_when: str | None = None


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, inputs: tuple[str, ...], variadic: bool = False,
                 stochastic: bool = False, needs_stats: str | None = None,
                 space: str = "weight", bounds: dict[str, str] | None = None,
                 docs: dict[str, str] | None = None, elementwise: bool = False,
                 draws: tuple[str, ...] = ("seed",), drawn_when: str | None = None
                 ) -> Callable[[Callable], Callable]:
    """Register the decorated function as merge method `name`.

    `bounds` gives parameter ranges in interval notation ({"density": "(0, 1]"}); `docs` a
    short description per parameter. A stochastic method's `draws` are the parameters that
    shape its random draws (recorded with their values even when left at the defaults), and
    `drawn_when` a bool parameter without which it draws nothing. The function is returned
    unchanged.
    """

    def register(func: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered "
                             f"(by {METHODS[name].func.__module__})")
        method = _describe(func, name, tuple(inputs), variadic, stochastic,
                           needs_stats, space, bounds or {}, docs or {})
        if stochastic:
            where = f"merge method {name!r}"
            if "seed" not in draws or not set(draws) <= set(method.params):
                raise ValueError(f"{where}: draws={draws} must name its parameters, seed too")
            switch = method.params.get(drawn_when) if drawn_when is not None else None
            if drawn_when is not None and (switch is None or switch.kind is not bool):
                raise ValueError(f"{where}: drawn_when={drawn_when!r} is no bool parameter")
            method = dataclasses.replace(method, draws=tuple(draws), drawn_when=drawn_when)
        METHODS[name] = dataclasses.replace(method, elementwise=elementwise)
        return func

    return register


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`; `UnknownMethod` names the nearest ones if none is."""
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        known = sorted(METHODS)
        close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.6)
        raise UnknownMethod(str(name), close, known) from None


def method_names() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(METHODS)


def check_params(method: MergeMethod, given: dict[str, Any]) -> dict[str, Any]:
    """Validate recipe parameters for `method`; return every parameter, defaults filled in.

    Numbers may be given as int for a float parameter (and as a whole float for an int one);
    bools and strings must be exactly that. Values outside a parameter's range are refused.
    """
    result = {p.name: p.default for p in method.params.values()}
    for key, value in given.items():
        param = method.params.get(key)
        if param is None:
            raise BadParam(_unknown_param_text(method, str(key)))
        value = _coerce(method, param, value)
        _check_range(method, param, value)
        result[key] = value
    return result


def unrecorded_draws(method: MergeMethod, given: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the parameters shaping `method`'s random draws that `given` (name ->
    value as given, or per-key value) leaves out, when it draws at all: what a recipe must
    record besides `given` for the draws to stay the same when a default changes."""
    if not method.draws:
        return {}
    if method.drawn_when is not None:
        switch = given.get(method.drawn_when, method.params[method.drawn_when].default)
        constant = getattr(switch, "is_constant", False)  # a per-key value: its default
        if switch is False or (constant and switch.default is False):
            return {}
    return {name: method.params[name].default for name in method.draws if name not in given}


# --- building a MergeMethod from a function -------------------------------------------------


def _describe(func: Callable, name: str, inputs: tuple[str, ...], variadic: bool,
              stochastic: bool, needs_stats: str | None, space: str, bounds: dict[str, str],
              docs: dict[str, str]) -> MergeMethod:
    where = f"merge method {name!r} ({func.__module__}.{func.__qualname__})"
    if space not in SPACES:
        raise ValueError(f"{where}: space must be one of {SPACES}, not {space!r}")
    doc = inspect.getdoc(func)
    if not doc:
        raise ValueError(f"{where}: needs a docstring whose first line is its formula")
    signature = inspect.signature(func, eval_str=True)
    positional = [p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
    if not inputs or tuple(positional) != inputs or has_var != variadic:
        raise ValueError(f"{where}: inputs={inputs}, variadic={variadic} do not match the "
                         f"signature {signature}")
    keywords = {p.name: p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
    if stochastic != ("generator" in keywords) or (stochastic and "seed" not in keywords):
        raise ValueError(f"{where}: stochastic methods take `generator` and `seed` keywords "
                         "and only they take `generator`")
    if (needs_stats is None) == ("stats" in keywords):
        raise ValueError(f"{where}: a `stats` keyword comes with needs_stats and only with it")
    unknown = (set(bounds) | set(docs)) - set(keywords)
    if unknown:
        raise ValueError(f"{where}: bounds/docs for parameters it lacks: {sorted(unknown)}")
    params = {}
    for key, p in keywords.items():
        if key in SUPPLIED_BY_EXECUTOR:
            continue
        if p.default is p.empty:
            raise ValueError(f"{where}: parameter {key!r} needs a default")
        kind = p.annotation if p.annotation is not p.empty else type(p.default)
        if kind not in PARAM_KINDS:
            raise ValueError(f"{where}: parameter {key!r} must be float, int, bool or str")
        low, high, low_open, high_open = _parse_interval(bounds.get(key), where, key)
        params[key] = Param(key, p.default, kind, low, high, docs.get(key, ""), low_open,
                            high_open)
    return MergeMethod(name=name, func=func, inputs=inputs, variadic=variadic, params=params,
                       stochastic=stochastic, space=space, formula=doc.splitlines()[0].strip(),
                       needs_stats=needs_stats)


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


def _parse_interval(text: str | None, where: str, key: str):
    if text is None:
        return None, None, False, False
    match = _INTERVAL.match(text)
    if not match:
        raise ValueError(f"{where}: bounds for {key!r} must look like '(0, 1]', not {text!r}")
    left, low, high, right = match.groups()
    low_value = None if low == "-inf" else _parse_number(low)
    high_value = None if high == "inf" else _parse_number(high)
    return low_value, high_value, left == "(", right == ")"


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


# --- checking values ---------------------------------------------------------------------------


def _coerce(method: MergeMethod, param: Param, value: Any) -> Any:
    def refuse(wanted: str):
        return BadParam(f"parameter {param.name!r} of merge method {method.name!r} must be "
                        f"{wanted}, not {value!r} ({type(value).__name__}){_as_text(value)}")

    if param.kind is bool:
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if param.kind is str:
        if not isinstance(value, str):
            raise refuse("a string")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse("an integer" if param.kind is int else "a number")
    if not math.isfinite(value):
        raise refuse("a finite number")
    if param.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise refuse("an integer")
        return int(value)
    return float(value)


def _as_text(value: Any) -> str:
    """Why a number came as a string: YAML 1.1 reads `1e-3` and `1e400` as text (its floats
    need a point and a signed exponent), which users of every other syntax do not expect."""
    if not isinstance(value, str) or not any(c.isdigit() for c in value):  # not "nan"
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return "; YAML reads that as text: write a point and a signed exponent, e.g. 1.0e-3"


def _check_range(method: MergeMethod, param: Param, value: Any) -> None:
    if param.kind not in (int, float):
        return
    too_low = param.minimum is not None and (
        value <= param.minimum if param.min_exclusive else value < param.minimum)
    too_high = param.maximum is not None and (
        value >= param.maximum if param.max_exclusive else value > param.maximum)
    if too_low or too_high:
        raise BadParam(f"parameter {param.name!r} of merge method {method.name!r} must be in "
                       f"{param.range_text()}, not {_number(value)}")


def _unknown_param_text(method: MergeMethod, key: str) -> str:
    valid = list(method.params)
    if not valid:
        return f"merge method {method.name!r} takes no parameters, but {key!r} was given"
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.6)
    hint = f"did you mean {_either(close)}? It takes" if close else "it takes"
    return f"merge method {method.name!r} has no parameter {key!r}; {hint}: {', '.join(valid)}."


def _either(names: list[str]) -> str:
    return " or ".join(repr(n) for n in names)


def _number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in family; the registry cannot import it at
    # module level because the families import the decorator from here.
    import mergekit_sd.merge.methods  # noqa: F401
