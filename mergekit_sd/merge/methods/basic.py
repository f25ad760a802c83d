"""Linear merges: weighted sum, add difference, supermerger's sum twice and triple sum, copy.

All follow AUTOMATIC1111's and supermerger's conventions: alpha is the share of the *second*
model. None of them clamps alpha or beta: values outside [0, 1] extrapolate, which users do on
purpose (e.g. alpha = 1.2 to push past B, or a negative alpha to move away from it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergekit_sd.merge.registry import merge_method

ALPHA_DOC = "share of B (0 keeps A, 1 gives B; not clamped, so values outside extrapolate)"


@merge_method("weighted_sum", elementwise=True, inputs=("a", "b"), docs={"alpha": ALPHA_DOC})
def weighted_sum(a: Tensor, b: Tensor, *, alpha: float = 0.5) -> Tensor:
    """(1 - alpha) * A + alpha * B

    Linear interpolation from A to B, AUTOMATIC1111's "Weighted sum" with multiplier M = alpha.
    ComfyUI's ModelMergeSimple `ratio` is the reverse (the share of its first model), so
    ComfyUI ratio r is alpha = 1 - r here. alpha == 0 returns A and alpha == 1 returns B
    themselves, untouched.
    """
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    return torch.lerp(a, b, float(alpha))


@merge_method("add_difference", elementwise=True, inputs=("a", "b", "c"),
              docs={"alpha": "how much of the difference B - C to add (not clamped)"})
def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """A + alpha * (B - C)

    Adds what training changed from C to B (e.g. a finetune minus its base) onto A, as in
    AUTOMATIC1111's "Add difference". alpha == 0 returns A itself.
    """
    if alpha == 0:
        return a
    diff = torch.sub(b, c)
    if alpha != 1:
        diff.mul_(float(alpha))
    return diff.add_(a)


@merge_method("sum_twice", elementwise=True, inputs=("a", "b", "c"),
              docs={"alpha": "share of B in the first sum", "beta": "share of C in the second"})
def sum_twice(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 0.5,
              beta: float = 0.5) -> Tensor:
    """(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C

    supermerger's "sum Twice": a weighted sum of A and B, then a weighted sum of that and C.
    beta == 0 is weighted_sum(A, B, alpha) (with its fast paths); beta == 1 returns C itself.
    """
    first = weighted_sum(a, b, alpha=alpha)
    if beta == 0:
        return first
    if beta == 1:
        return c
    if first is a or first is b:
        return torch.lerp(first, c, float(beta))
    return first.lerp_(c, float(beta))


@merge_method("triple_sum", elementwise=True, inputs=("a", "b", "c"),
              docs={"alpha": "share of B", "beta": "share of C (A gets 1 - alpha - beta)"})
def triple_sum(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 0.33,
               beta: float = 0.33) -> Tensor:
    """(1 - alpha - beta) * A + alpha * B + beta * C

    supermerger's "Triple sum": a weighted average of three models. When the three weights are
    0 except one that is 1, that input is returned itself.
    """
    if beta == 0 and alpha in (0, 1):
        return b if alpha == 1 else a
    if alpha == 0 and beta == 1:
        return c
    out = torch.mul(a, 1.0 - alpha - beta)
    return out.add_(b, alpha=float(alpha)).add_(c, alpha=float(beta))


@merge_method("copy", elementwise=True, inputs=("a",))
def copy(a: Tensor) -> Tensor:
    """A

    Takes the tensor from one model as it is: useful per block or per component (e.g. keep
    one model's text encoder or VAE). Returns A itself.
    """
    return a
