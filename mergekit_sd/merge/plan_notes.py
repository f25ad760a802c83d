"""Notes of a plan about the recipe itself, not its keys: parts that do nothing.

Steps the output step does not need, models none of its steps takes, and draws' parameters
(a `ties` seed) given to a step that draws nothing are skipped by the merge; said, since the
recipe looks as if they mattered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_sd.recipe.params import KeyedValue
from mergekit_sd.recipe.schema import Recipe

if TYPE_CHECKING:
    from mergekit_sd.merge.plan import StepPlan


def value_options(keyed: KeyedValue) -> list[tuple[tuple, object]]:
    """(field under the parameter, value) of every value it can take: a bad one is said at
    the block, component or key pattern as written (IN00-IN05), not at the parameter."""
    written = {}
    for kind, name, named in keyed.selectors:  # a later one wins, as in the values
        written.update({(kind, n): name for n in named})
    return [((), keyed.default),
            *((("blocks", written.get(("blocks", b), b)), v) for b, v in keyed.by_block.items()),
            *((("components", written.get(("components", s), s)), v)
              for s, v in keyed.by_slot.items()),
            *((("keys", w), v) for w, _, v in keyed.by_pattern)]


def unused_parts_text(recipe: Recipe) -> list[str]:
    """Steps the output step does not need and models none of its steps takes are skipped:
    said, since a user who lists several steps may expect several outputs, or have mistyped
    an input."""
    steps, models = recipe.unused()
    final = recipe.final_step.name
    said = []
    if steps:
        names = ", ".join(s.name for s in steps)
        one = len(steps) == 1
        said.append(f"step{'' if one else 's'} {names} {'is' if one else 'are'} not used by "
                     f"the output step {final}, so {'it is' if one else 'they are'} not run; "
                     "a recipe writes one step, output.step (the last by default): name the "
                     f"one to write there, or remove {'it' if one else 'them'}")
    if models:
        names = ", ".join(models)
        one = len(models) == 1
        said.append(f"model{'' if one else 's'} {names} {'is' if one else 'are'} taken by no "
                     f"step the output step {final} needs, so {'it is' if one else 'they are'}"
                     f" not read; give {'it' if one else 'them'} as an input of such a step, "
                     f"or remove {'it' if one else 'them'} from models")
    return said


def idle_draws_text(steps: list[StepPlan]) -> list[str]:
    """`ties` with a seed or dare_rate but no `dare: true` draws nothing: said, as a recipe
    that sets them (or sweeps the seed) looks as if they mattered."""
    said = []
    for sp in steps:
        method, switch = sp.method, sp.method.drawn_when
        given = [name for name in method.draws if name in sp.step.params]
        if switch is None or not given:
            continue
        default = method.params[switch].default
        values = [keyed.get(switch) for keyed in sp.params.values()]
        if any(default if v is None else any(default if o is None else o
                                             for _, o in value_options(v)) for v in values):
            continue  # drawn for some key of some candidate
        it, is_ = ("it", "it is") if len(given) == 1 else ("them", "they are")
        said.append(f"step {sp.step.name}: {method.name} uses {' and '.join(given)} only with "
                    f"{switch}: true, which this step does not set, so {is_} ignored; set "
                    f"{switch}: true or remove {it}")
    return said
