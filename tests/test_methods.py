"""Merge methods against their formulas, computed directly with plain torch in float64, and the
registry's answers to bad names and values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mergekit_sd.errors import UserError
from mergekit_sd.merge.methods import basic, geometric, supermerger, ties
from mergekit_sd.merge.registry import (
    METHODS,
    BadParam,
    UnknownMethod,
    check_params,
    get_method,
    merge_method,
    method_names,
)

# conv 4-D, linear 2-D, bias 1-D, one element, 0-dim
SHAPES = [(32, 16, 3, 3), (40, 24), (17,), (1,), ()]
SHAPE_IDS = ["conv", "linear", "bias", "one", "scalar"]


def rand(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def inputs(shape, count: int, seed: int = 0) -> list[torch.Tensor]:
    return [rand(shape, seed * 100 + i) for i in range(count)]


def assert_formula(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 result against the exact (float64) formula: 1e-6 absolute plus float32's
    unavoidable rounding of the larger entries."""
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=1e-6)


def call(name: str, *tensors, **params):
    return get_method(name).func(*tensors, **params)


def test_every_family_is_registered_with_its_formula():
    assert set(method_names()) == {"weighted_sum", "add_difference", "sum_twice", "triple_sum",
                                   "copy", "slerp", "ties", "train_difference", "cosine_a",
                                   "cosine_b", "bake_lora"}
    for name in method_names():
        method = get_method(name)
        assert method.formula == method.func.__doc__.strip().splitlines()[0]
        assert method.space == "weight"
    assert get_method("ties").inputs == ("base",) and get_method("ties").variadic
    assert get_method("ties").stochastic and "generator" not in get_method("ties").params
    assert get_method("cosine_a").needs_stats == "cosine"
    assert "stats" not in get_method("cosine_a").params


# --- linear methods ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("alpha", [0.3, 0.75, 1.4, -0.2])
def test_weighted_sum_formula(shape, alpha):
    a, b = inputs(shape, 2)
    assert_formula(call("weighted_sum", a, b, alpha=alpha),
                   (1 - alpha) * a.double() + alpha * b.double())


def test_weighted_sum_alpha_is_the_share_of_b():
    a, b = inputs((8, 8), 2)
    assert_formula(basic.weighted_sum(a, b, alpha=0.3), 0.7 * a.double() + 0.3 * b.double())


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("alpha", [1.0, 0.4, -0.5, 2])
def test_add_difference_formula(shape, alpha):
    a, b, c = inputs(shape, 3)
    assert_formula(call("add_difference", a, b, c, alpha=alpha),
                   a.double() + alpha * (b.double() - c.double()))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.5), (0.2, 0.7), (0, 0.4), (1, 0.3),
                                             (1.2, -0.1)])
def test_sum_twice_formula(shape, alpha, beta):
    a, b, c = (t.double() for t in inputs(shape, 3))
    result = call("sum_twice", *(t.float() for t in (a, b, c)), alpha=alpha, beta=beta)
    assert_formula(result, (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("alpha", "beta"), [(0.33, 0.33), (0.1, 0.6), (0, 0.5), (0.5, 0),
                                             (0.8, 0.4)])
def test_triple_sum_formula(shape, alpha, beta):
    a, b, c = inputs(shape, 3)
    assert_formula(call("triple_sum", a, b, c, alpha=alpha, beta=beta),
                   (1 - alpha - beta) * a.double() + alpha * b.double() + beta * c.double())


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_is_a(shape):
    (a,) = inputs(shape, 1)
    assert call("copy", a) is a


def test_fast_paths_return_the_input_itself():
    a, b, c = inputs((6, 5), 3)
    assert basic.weighted_sum(a, b, alpha=0) is a
    assert basic.weighted_sum(a, b, alpha=1) is b
    assert basic.add_difference(a, b, c, alpha=0) is a
    assert basic.sum_twice(a, b, c, alpha=0, beta=0) is a
    assert basic.sum_twice(a, b, c, alpha=1, beta=0) is b
    assert basic.sum_twice(a, b, c, alpha=0.4, beta=1) is c
    assert basic.triple_sum(a, b, c, alpha=0, beta=0) is a
    assert basic.triple_sum(a, b, c, alpha=1, beta=0) is b
    assert basic.triple_sum(a, b, c, alpha=0, beta=1) is c
    assert geometric.slerp(a, b, alpha=0) is a
    assert geometric.slerp(a, b, alpha=1) is b
    assert ties.ties(a, b, c, alpha=0) is a
    assert ties.ties(a) is a
    assert supermerger.train_difference(a, b, c, alpha=0) is a
    assert supermerger.train_difference(a, b, b.clone(), alpha=0.7) is a


# --- slerp ------------------------------------------------------------------------------------


def slerp_reference(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    a, b = a.double(), b.double()
    norm_a, norm_b = a.norm(), b.norm()
    angle = torch.arccos(torch.dot(a.flatten(), b.flatten()) / (norm_a * norm_b))
    direction = (torch.sin((1 - alpha) * angle) * a / norm_a
                 + torch.sin(alpha * angle) * b / norm_b) / torch.sin(angle)
    return ((1 - alpha) * norm_a + alpha * norm_b) * direction


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9, 1.3])
def test_slerp_formula(shape, alpha):
    a, b = inputs(shape, 2, seed=3)
    if a.numel() <= 1:  # one entry: no direction to rotate, so linear
        expected = (1 - alpha) * a.double() + alpha * b.double()
    else:
        expected = slerp_reference(a, b, alpha)
    assert_formula(geometric.slerp(a, b, alpha=alpha), expected)


def test_slerp_of_orthogonal_unit_vectors_is_the_midpoint_on_the_circle():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    half = math.sqrt(0.5)
    assert_formula(geometric.slerp(a, b, alpha=0.5), torch.tensor([half, half],
                                                                  dtype=torch.float64))
    third = geometric.slerp(a, b, alpha=1 / 3)
    assert_formula(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)],
                                       dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_slerp_keeps_the_norm_of_equal_norm_inputs(alpha):
    a, b = inputs((64, 32), 2, seed=5)
    b = b * (a.norm() / b.norm())
    result = geometric.slerp(a, b, alpha=alpha)
    assert result.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    lerped = torch.lerp(a, b, alpha)  # the chord cuts inside the sphere
    assert lerped.norm().item() < 0.99 * a.norm().item()


@pytest.mark.parametrize("factor", [2.5, 0.1, -1.0, -3.0])
def test_slerp_equals_lerp_for_colinear_inputs(factor):
    (a,) = inputs((16, 8), 1, seed=7)
    b = a * factor
    assert_formula(geometric.slerp(a, b, alpha=0.3), 0.7 * a.double() + 0.3 * b.double())


def test_slerp_with_a_zero_tensor_is_lerp():
    (a,) = inputs((10,), 1)
    zero = torch.zeros(10)
    assert_formula(geometric.slerp(a, zero, alpha=0.4), 0.6 * a.double())
    assert_formula(geometric.slerp(zero, a, alpha=0.4), 0.4 * a.double())


# --- ties -------------------------------------------------------------------------------------


def ties_reference(base, models, alpha, density=1.0, dare_rate=None, seed=0):
    """TIES / DARE-TIES written out directly; float64 except the magnitude ranking."""
    kept = []
    generator = torch.Generator().manual_seed(seed)
    for m in models:
        delta32 = m - base
        delta = m.double() - base.double()
        if dare_rate is not None:
            keep = torch.rand(m.shape, generator=generator) >= dare_rate
            delta = delta * keep / (1 - dare_rate)
        else:
            n = delta.numel()
            k = max(1, math.ceil(round(density * n, 9)))
            mask = torch.zeros(n, dtype=torch.bool)
            mask[delta32.abs().flatten().topk(k).indices] = True
            delta = delta * mask.reshape(delta.shape)
        kept.append(delta)
    stacked = torch.stack(kept)
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (elected != 0)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base.double() + alpha * merged


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("count", "alpha", "density"), [(2, 1.0, 1.0), (3, 1.0, 0.2),
                                                         (3, 0.6, 0.5), (1, 1.5, 0.3)])
def test_ties_formula(shape, count, alpha, density):
    base, *models = inputs(shape, count + 1, seed=11)
    result = ties.ties(base, *models, alpha=alpha, density=density)
    assert_formula(result, ties_reference(base, models, alpha, density))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("count", "rate"), [(2, 0.9), (3, 0.5), (1, 0.3)])
def test_dare_ties_formula(shape, count, rate):
    base, *models = inputs(shape, count + 1, seed=13)
    result = ties.ties(base, *models, alpha=0.8, dare=True, dare_rate=rate,
                       generator=torch.Generator().manual_seed(42))
    assert_formula(result, ties_reference(base, models, 0.8, dare_rate=rate, seed=42))


def test_ties_with_one_model_and_full_density_adds_the_delta():
    base, model = inputs((12, 7), 2)
    assert_formula(ties.ties(base, model, alpha=0.7, density=1.0),
                   base.double() + 0.7 * (model.double() - base.double()))


def test_ties_elects_signs_and_takes_the_disjoint_mean():
    base = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0])
    models = [base + torch.tensor(d) for d in ([1.0, -2.0, 3.0, 0.0, 2.0],
                                               [2.0, 1.0, -1.0, 0.0, -1.0],
                                               [-1.0, 1.0, -4.0, 0.0, -1.0])]
    # sums [2, 0, -2, 0, 0] elect [+, none, -, none, none]; entry 0 averages 1 and 2, entry 2
    # averages -1 and -4; entries whose sum is 0 (also 2 - 1 - 1) take nothing.
    expected = torch.tensor([1.5, 0.0, -2.5, 0.0, 0.0])
    assert torch.equal(ties.ties(base, *models, alpha=1.0, density=1.0), base + expected)
    assert torch.equal(ties.ties(base, *models, alpha=0.5, density=1.0), base + expected / 2)


def test_ties_trims_before_electing():
    base = torch.zeros(4)
    first = torch.tensor([-9.0, 0.3, 0.2, 0.1])
    second = torch.tensor([1.0, 2.0, 8.0, 0.5])
    # density 0.5 keeps 2 of 4 entries per model: [-9, 0.3, _, _] and [_, 2, 8, _]
    trimmed = ties.ties(base, first, second, density=0.5)
    assert_formula(trimmed, torch.tensor([-9.0, 1.15, 8.0, 0.0], dtype=torch.float64))
    untrimmed = ties.ties(base, first, second, density=1.0)
    assert_formula(untrimmed, torch.tensor([-9.0, 1.15, 4.1, 0.3], dtype=torch.float64))


@pytest.mark.parametrize(("numel", "density", "kept"), [
    (1000, 0.25, 250), (10, 0.7, 7), (10, 0.75, 8), (3, 0.2, 1), (1, 0.01, 1), (7, 1.0, 7)])
def test_trimming_keeps_ceil_of_density_times_entries_per_model(numel, density, kept):
    """Trimming keeps exactly ceil(density * n) entries (at least one) of every model's
    delta, the largest magnitudes, even where magnitudes tie."""
    assert ties.kept_count(numel, density) == kept
    deltas = torch.stack([rand(numel, 1), rand(numel, 2), torch.ones(numel)])
    original = deltas.clone()
    ties.trim_by_magnitude_(deltas, density)
    for row, before in zip(deltas, original, strict=True):
        assert torch.count_nonzero(row) == kept
        kept_mask = row != 0
        assert torch.equal(row[kept_mask], before[kept_mask])
        if kept < numel:
            assert before[kept_mask].abs().min() >= before[~kept_mask].abs().max()


def test_ties_on_one_model_keeps_the_largest_deltas():
    base = torch.zeros(50, 20)
    (model,) = inputs((50, 20), 1, seed=17)
    result = ties.ties(base, model, density=0.3)
    assert torch.count_nonzero(result) == 300
    threshold = model.abs().flatten().topk(300).values[-1]
    assert torch.equal(result, torch.where(model.abs() >= threshold, model, 0.0))


def test_dare_is_reproducible_from_its_seed():
    base, *models = inputs((30, 30), 3, seed=19)

    def run(seed):
        return ties.ties(base, *models, dare=True, dare_rate=0.7,
                         generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # called directly without a generator, the `seed` parameter seeds one
    assert torch.equal(ties.ties(base, *models, dare=True, dare_rate=0.7, seed=1), run(1))


def test_dare_drop_keeps_each_entry_unbiased():
    delta = rand((32, 32), 23)
    rate = 0.9
    draws = 1000
    total = torch.zeros_like(delta)
    for seed in range(draws):
        dropped = ties.dare_drop_(delta.clone().unsqueeze(0), rate,
                                  torch.Generator().manual_seed(seed))[0]
        kept = dropped != 0
        assert torch.allclose(dropped[kept], delta[kept] / (1 - rate))
        total += dropped
    mean = total / draws
    # one draw per entry has std 3|d| at rate 0.9; the mean of 1000 about 0.095 |d|
    assert (mean - delta).abs().mean() < 0.12 * delta.abs().mean()
    slope = (mean * delta).sum() / (delta * delta).sum()
    assert slope.item() == pytest.approx(1.0, abs=0.02)


def test_dare_ties_with_one_model_is_unbiased():
    base = rand((16, 16), 29)
    delta = rand((16, 16), 31).abs() + 0.1
    total = torch.zeros_like(base)
    draws = 1000
    for seed in range(draws):
        total += ties.ties(base, base + delta, alpha=0.5, dare=True, dare_rate=0.8,
                           generator=torch.Generator().manual_seed(seed))
    mean_shift = (total / draws - base).sum() / (0.5 * delta).sum()
    assert mean_shift.item() == pytest.approx(1.0, abs=0.02)


# --- supermerger ------------------------------------------------------------------------------


def train_difference_reference(a, b, c, alpha):
    """supermerger's trainDifference, step by step."""
    a, b, c = a.double(), b.double(), c.double()
    diff = b - c
    distance_bc = torch.abs(b - c)
    distance_ba = torch.abs(b - a)
    total = distance_bc + distance_ba
    scale = torch.where(total != 0, distance_ba / total, torch.zeros_like(total))
    scale = torch.sign(b - c) * torch.abs(scale)
    return a + scale * torch.abs(diff) * (alpha * 1.8)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("alpha", [1.0, 0.5, -0.3])
def test_train_difference_formula(shape, alpha):
    a, b, c = inputs(shape, 3, seed=37)
    assert_formula(supermerger.train_difference(a, b, c, alpha=alpha),
                   train_difference_reference(a, b, c, alpha))


def test_train_difference_where_b_equals_c_or_a_entrywise():
    a = torch.tensor([1.0, 2.0, 3.0, 5.0])
    b = torch.tensor([1.0, 4.0, 3.0, 2.0])
    c = torch.tensor([1.0, 4.0, 0.0, 0.0])
    # entry 0: all equal -> unchanged; 1: B == C -> nothing to add; 2: A already at B ->
    # nothing to add; 3: |B-A| = 3, |B-C| = 2 -> 1.8 * 2 * 3/5 = 2.16 added
    result = supermerger.train_difference(a, b, c, alpha=1.0)
    assert_formula(result, torch.tensor([1.0, 2.0, 3.0, 5.0 + 2.16], dtype=torch.float64))


def cosine_reference(a, b, alpha, stats, variant):
    """supermerger's cosineA / cosineB per key, with torch's own normalize/cosine_similarity."""
    shape = a.shape
    a, b = a.double().reshape(a.shape or (1,)), b.double().reshape(b.shape or (1,))
    if variant == "a":
        a_unit, b_unit = F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)
        columns = F.cosine_similarity(a_unit, b_unit, dim=0)
        whole = torch.dot(a_unit.flatten(), b_unit.flatten()) / (a_unit.norm() * b_unit.norm())
        shift = abs(alpha)
    else:
        columns = F.cosine_similarity(a, b, dim=0)
        whole = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
        shift = alpha
    combined = (columns + whole) / 2
    k = (combined - stats["min"]) / (stats["max"] - stats["min"]) - shift
    k = k.clip(min=0, max=1)
    return (b * (1 - k) + a * k).reshape(shape), k


def related_pair(shape, seed):
    """Two tensors like two finetunes of one model: B is A plus column-dependent noise."""
    a = rand(shape, seed)
    noise = rand(shape, seed + 1) * rand(shape[1:] if shape else (), seed + 2).abs()
    return a, a + 0.8 * noise


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("alpha", [0.0, 0.2, -0.3])
@pytest.mark.parametrize("variant", ["a", "b"])
def test_cosine_formula(shape, alpha, variant):
    a, b = related_pair(shape, 41)
    stats = {"min": 0.3, "max": 0.95}
    result = call(f"cosine_{variant}", a, b, alpha=alpha, stats=stats)
    expected, k = cosine_reference(a, b, alpha, stats, variant)
    assert_formula(result, expected)
    if len(shape) >= 2:  # the columns really get different weights, some strictly inside (0, 1)
        assert ((k > 0) & (k < 1)).any() and k.unique().numel() > 1


def test_cosine_a_and_b_differ_where_supermerger_differs():
    a, b = related_pair((24, 12), 43)
    stats = {"min": 0.3, "max": 0.95}
    # negative alpha: cosineA subtracts |alpha|, cosineB adds it
    low = supermerger.cosine_a(a, b, alpha=-0.2, stats=stats)
    high = supermerger.cosine_b(a, b, alpha=-0.2, stats=stats)
    assert (high - b).abs().sum() > (low - b).abs().sum()


def test_cosine_keeps_columns_that_agree_and_takes_b_where_they_do_not():
    a = torch.tensor([[1.0, 1.0], [2.0, 0.0], [3.0, -1.0]])
    b = torch.tensor([[2.0, -1.0], [4.0, 0.0], [6.0, 1.0]])  # column 0 parallel, 1 opposite
    # whole-tensor cosine 26 / sqrt(16 * 58) = 0.853: s = 0.93 for column 0, -0.07 for 1
    result = supermerger.cosine_b(a, b, alpha=0.0, stats={"min": 0.0, "max": 0.9})
    assert torch.equal(result[:, 0], a[:, 0])
    assert torch.equal(result[:, 1], b[:, 1])


def test_cosine_without_spread_counts_every_column_as_most_similar():
    a, b = related_pair((8, 4), 47)
    result = supermerger.cosine_b(a, b, alpha=0.25, stats={"min": 0.7, "max": 0.7})
    assert_formula(result, 0.25 * b.double() + 0.75 * a.double())


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cosine_key_stat_is_the_mean_column_cosine(shape):
    a, b = related_pair(shape, 53)
    flat_a, flat_b = a.double().reshape(a.shape or (1,)), b.double().reshape(b.shape or (1,))
    expected = F.cosine_similarity(flat_a, flat_b, dim=0).mean().item()
    assert supermerger.cosine_key_stat(a, b) == pytest.approx(expected, abs=1e-6)


def test_cosine_key_stat_compares_the_common_part_of_mismatched_shapes():
    a, b = related_pair((8, 9, 3, 3), 59)
    wider = torch.cat([a, torch.zeros(8, 4, 3, 3)], dim=1)  # inpainting-style extra channels
    assert supermerger.cosine_key_stat(wider, b) == pytest.approx(
        supermerger.cosine_key_stat(a, b), abs=1e-6)


# --- inputs are left alone --------------------------------------------------------------------

CALLS = [
    ("weighted_sum", 2, {"alpha": 0.4}),
    ("add_difference", 3, {"alpha": 0.7}),
    ("sum_twice", 3, {"alpha": 0.3, "beta": 0.6}),
    ("triple_sum", 3, {"alpha": 0.2, "beta": 0.3}),
    ("copy", 1, {}),
    ("slerp", 2, {"alpha": 0.6}),
    ("ties", 4, {"density": 0.3}),
    ("ties", 3, {"dare": True, "dare_rate": 0.5}),
    ("train_difference", 3, {"alpha": 0.8}),
    ("cosine_a", 2, {"alpha": 0.1, "stats": {"min": 0.0, "max": 1.0}}),
    ("cosine_b", 2, {"alpha": 0.1, "stats": {"min": 0.0, "max": 1.0}}),
]


@pytest.mark.parametrize(("name", "count", "params"), CALLS, ids=[c[0] for c in CALLS])
def test_methods_leave_their_inputs_untouched_and_accept_sliced_views(name, count, params):
    wide = inputs((20, 30), count, seed=61)
    views = [t[:, 5:17] for t in wide]  # what the executor passes for mismatched shapes
    originals = [t.clone() for t in wide]
    extra = {"generator": torch.Generator().manual_seed(0)} if name == "ties" else {}
    result = call(name, *views, **params, **extra)
    for t, before in zip(wide, originals, strict=True):
        assert torch.equal(t, before)
    extra = {"generator": torch.Generator().manual_seed(0)} if name == "ties" else {}
    contiguous = call(name, *(v.contiguous() for v in views), **params, **extra)
    assert result.shape == (20, 12)
    assert torch.equal(result, contiguous)
    check_params(get_method(name), {k: v for k, v in params.items() if k != "stats"})


# --- registry ---------------------------------------------------------------------------------


def test_unknown_method_names_the_nearest():
    with pytest.raises(UnknownMethod, match=r"'weighted_som'; did you mean 'weighted_sum'\?"):
        get_method("weighted_som")
    with pytest.raises(UserError, match="did you mean 'slerp'"):
        get_method("slerpp")
    with pytest.raises(UnknownMethod, match="known: add_difference, bake_lora, copy") as caught:
        get_method("zzzz")
    assert caught.value.suggestions == []


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        @merge_method("weighted_sum", inputs=("a", "b"))
        def imposter(a, b, *, alpha: float = 0.5):
            """A"""
            return a

    assert get_method("weighted_sum").func is basic.weighted_sum
    try:
        @merge_method("test_only_once", inputs=("a",))
        def once(a):
            """A"""
            return a

        with pytest.raises(ValueError, match="already registered"):
            merge_method("test_only_once", inputs=("a",))(once)
    finally:
        METHODS.pop("test_only_once", None)


def test_registration_checks_the_signature():
    def two(a, b, *, alpha: float = 0.5):
        """A"""
        return a

    with pytest.raises(ValueError, match="do not match the signature"):
        merge_method("test_bad_inputs", inputs=("a",))(two)
    with pytest.raises(ValueError, match="generator"):
        merge_method("test_bad_stochastic", inputs=("a", "b"), stochastic=True)(two)
    assert "test_bad_inputs" not in METHODS and "test_bad_stochastic" not in METHODS


def test_check_params_fills_defaults_and_coerces_numbers():
    method = get_method("ties")
    assert check_params(method, {}) == {"alpha": 1.0, "density": 0.2, "dare": False,
                                        "dare_rate": 0.9, "seed": 0}
    checked = check_params(method, {"alpha": 2, "density": 1, "seed": 7.0, "dare": True})
    assert checked["alpha"] == 2.0 and isinstance(checked["alpha"], float)
    assert checked["seed"] == 7 and isinstance(checked["seed"], int)
    assert checked["density"] == 1.0 and checked["dare"] is True


def test_check_params_names_the_nearest_parameter():
    with pytest.raises(BadParam, match=r"no parameter 'alpah'; did you mean 'alpha'\?"):
        check_params(get_method("weighted_sum"), {"alpah": 0.5})
    with pytest.raises(UserError, match="did you mean 'dare_rate'"):
        check_params(get_method("ties"), {"dare_rte": 0.5})
    with pytest.raises(BadParam, match="takes no parameters"):
        check_params(get_method("copy"), {"alpha": 0.5})


@pytest.mark.parametrize(("name", "given", "message"), [
    ("weighted_sum", {"alpha": "0.5"}, "must be a number"),
    ("weighted_sum", {"alpha": True}, "must be a number"),
    ("weighted_sum", {"alpha": None}, "must be a number"),
    ("weighted_sum", {"alpha": float("nan")}, "finite"),
    ("ties", {"dare": 1}, "true or false"),
    ("ties", {"dare": "yes"}, "true or false"),
    ("ties", {"seed": 1.5}, "an integer"),
    ("ties", {"seed": False}, "an integer"),
])
def test_check_params_refuses_wrong_types(name, given, message):
    with pytest.raises(BadParam, match=message):
        check_params(get_method(name), given)


@pytest.mark.parametrize(("given", "interval"), [
    ({"density": 0}, r"\(0, 1\]"), ({"density": 1.5}, r"\(0, 1\]"),
    ({"density": -0.1}, r"\(0, 1\]"), ({"dare_rate": 1}, r"\[0, 1\)"),
    ({"dare_rate": -0.01}, r"\[0, 1\)"), ({"seed": -1}, r"\[0, inf\)"),
])
def test_check_params_refuses_out_of_range_values(given, interval):
    with pytest.raises(BadParam, match=f"must be in {interval}, not"):
        check_params(get_method("ties"), given)


def test_alpha_and_beta_are_not_clamped_so_users_can_extrapolate():
    for name in ("weighted_sum", "add_difference", "slerp", "train_difference", "cosine_a"):
        assert check_params(get_method(name), {"alpha": -3})["alpha"] == -3.0
        assert check_params(get_method(name), {"alpha": 5.5})["alpha"] == 5.5
    assert check_params(get_method("triple_sum"), {"alpha": 1.2, "beta": -0.4})["beta"] == -0.4
    edges = check_params(get_method("ties"), {"density": 1, "dare_rate": 0})
    assert edges["density"] == 1.0 and edges["dare_rate"] == 0.0
    a, b = inputs((5,), 2)
    assert_formula(basic.weighted_sum(a, b, alpha=1.5), -0.5 * a.double() + 1.5 * b.double())
