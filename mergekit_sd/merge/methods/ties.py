"""TIES-merging (Yadav et al. 2023), optionally with DARE's random drop (Yu et al. 2023).

Both merge several finetunes of one base through their deltas (model - base):

- TIES, "Resolving Interference When Merging Models" (arXiv:2306.01708): *trim* each delta to
  its largest-magnitude entries, *elect* a sign per entry from the sum of the trimmed deltas,
  and take the *disjoint mean*: per entry, the mean of only those deltas whose sign agrees.
- DARE, "Language Models are Super Mario" (arXiv:2311.03099): instead of trimming by
  magnitude, drop each delta entry at random with probability p and rescale the survivors by
  1 / (1 - p), which keeps every entry's expected value. TIES' election and disjoint mean then
  follow, as in mergekit's "dare_ties".

The steps are small functions of the stacked deltas (one row per model) so they can be read
and tested one at a time; those ending in `_` work in place on the deltas they are given.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergekit_sd.merge.registry import merge_method


@merge_method(
    "ties", inputs=("base",), variadic=True, stochastic=True,
    draws=("seed", "dare_rate"), drawn_when="dare",
    bounds={"density": "(0, 1]", "dare_rate": "[0, 1)", "seed": "[0, inf)"},
    docs={"alpha": "how much of the merged delta to add to the base (not clamped)",
          "density": "fraction of each delta's entries kept, largest magnitudes first",
          "dare": "drop entries at random (DARE) instead of trimming by magnitude",
          "dare_rate": "with dare: probability of dropping each delta entry",
          "seed": "with dare: seed of the random drop (mixed with each key's name)"})
def ties(base: Tensor, *models: Tensor, alpha: float = 1.0, density: float = 0.2,
         dare: bool = False, dare_rate: float = 0.9, seed: int = 0,
         generator: torch.Generator | None = None) -> Tensor:
    """base + alpha * disjoint_mean(elect(trim(M_i - base)))

    For every model M_i the delta d_i = M_i - base is trimmed to its ceil(density * n) entries
    of largest |d_i| (n = entries of the tensor; at least one; the rest set to 0). The sign of
    each entry is elected as sign(sum_i d_i) over the trimmed deltas, and the merged delta is,
    per entry, the mean of the d_i whose sign equals the elected one (0 where none does).
    With dare=True each d_i is instead thinned by DARE: every entry dropped with probability
    dare_rate, the rest multiplied by 1 / (1 - dare_rate); `density` is then unused. The draws
    come from `generator` (the executor seeds one per key from `seed`; called directly, a
    generator seeded with `seed` is used). One model with density 1 gives base + alpha * d_1.
    alpha == 0, or no models, returns base itself.
    """
    if alpha == 0 or not models:
        return base
    deltas = torch.stack(models).sub_(base)
    if dare:
        if generator is None:
            generator = torch.Generator(device=base.device).manual_seed(int(seed))
        dare_drop_(deltas, float(dare_rate), generator)
    else:
        trim_by_magnitude_(deltas, float(density))
    merged = disjoint_mean(deltas)
    return merged.mul_(float(alpha)).add_(base)


def kept_count(numel: int, density: float) -> int:
    """How many entries trimming keeps: ceil(density * numel), between 1 and numel."""
    # The small tolerance keeps float noise (0.7 * 10 = 7.000000000000001) from adding one.
    return min(numel, max(1, math.ceil(density * numel - 1e-6)))


def trim_by_magnitude_(deltas: Tensor, density: float) -> Tensor:
    """Zero all but the kept_count(n, density) largest-|d| entries of each row (model), in
    place; exactly that many are kept even when magnitudes tie."""
    rows = deltas.reshape(len(deltas), -1)  # a view: `deltas` comes from torch.stack
    k = kept_count(rows.shape[1], density)
    if k == rows.shape[1]:
        return deltas
    for row in rows:
        drop = torch.ones_like(row, dtype=torch.bool)
        drop[row.abs().topk(k, sorted=False).indices] = False
        row.masked_fill_(drop, 0)
    return deltas


def dare_drop_(deltas: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability `rate` and divide the survivors by (1 - rate), in place
    (each entry keeps its expected value). Draws one uniform number per entry, model by model."""
    if rate == 0:
        return deltas
    for row in deltas:
        draws = torch.rand(row.shape, generator=generator, device=row.device)
        row.mul_(draws >= rate).div_(1 - rate)
    return deltas


def disjoint_mean(deltas: Tensor) -> Tensor:
    """Per entry, the mean of the deltas whose sign equals sign(sum of all deltas); 0 where
    none does (so also where the sum is 0). Returns a new tensor of one delta's shape."""
    elected = deltas.sum(0).sign_()
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for delta in deltas:
        agree = delta.sign() == elected
        total.add_(delta * agree)
        count.add_(agree)
    return total.div_(count.clamp_(min=1))
