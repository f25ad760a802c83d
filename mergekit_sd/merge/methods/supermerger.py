"""supermerger's calculation modes: trainDifference, cosineA and cosineB.

These follow the definitions in hako-mikan's sd-webui-supermerger (scripts/mergers/mergers.py
and calcmode_en.md; cosineA/B came from recoilme's losslessmix, supermerger issue #33),
re-derived and written here in plain tensor terms.

The cosine modes need a whole-model statistic before any key can be merged: the executor
first runs `cosine_key_stat(a, b)` over every merged key and passes
stats = {"min": smallest, "max": largest} to `cosine_a` / `cosine_b`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergekit_sd.merge.registry import merge_method

# supermerger's fixed, empirical gain for trainDifference (its scale factor below averages
# about 1/2 where A is as far from B as C is).
TRAIN_DIFFERENCE_GAIN = 1.8
# Guards for divisions by norms of all-zero columns, as torch's own cosine_similarity uses.
EPS = 1e-8


@merge_method("train_difference", elementwise=True, inputs=("a", "b", "c"),
              docs={"alpha": "strength of the trained difference (not clamped)"})
def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """A + 1.8 * alpha * (B - C) * |B - A| / (|B - C| + |B - A|)

    supermerger's "trainDifference": add the difference B - C to A as if A had been trained
    on it. Each entry of B - C is scaled by |B - A| / (|B - C| + |B - A|) (0 where both are 0),
    so where A is already as far along as B little is added, and where A is far from B most of
    the difference is. This is supermerger's sign(B - C) * |B - C| * scale written out;
    1.8 is its fixed gain. alpha == 0, or B equal to C, returns A itself.
    """
    if alpha == 0 or torch.equal(b, c):
        return a
    diff = torch.sub(b, c)
    reach = torch.sub(b, a).abs_()
    # Where |B - C| + |B - A| == 0 the reach is 0 too, so clamping the sum away from 0 (to
    # float32's smallest normal) gives the 0 supermerger asks for without a torch.where.
    total = diff.abs().add_(reach).clamp_(min=torch.finfo(diff.dtype).tiny)
    return torch.addcmul(a, diff, reach.div_(total), value=TRAIN_DIFFERENCE_GAIN * alpha)


@merge_method("cosine_a", inputs=("a", "b"), needs_stats="cosine",
              docs={"alpha": "how far to pull toward B: subtracted (as |alpha|) from each "
                             "column's normalised similarity before clipping to [0, 1]"})
def cosine_a(a: Tensor, b: Tensor, *, alpha: float = 0.5, stats: dict) -> Tensor:
    """lerp(B, A, k), k = clip((s - min) / (max - min) - |alpha|, 0, 1), s from column cosines

    supermerger's cosineA ("favors model A's structure with details from B"). A tensor is seen
    as columns along its first axis (rows of a linear weight are its outputs, so a column is
    everything one input feeds; a conv weight's columns are one per (in, kh, kw); a 1-D
    tensor is one column; a 0-dim one, one entry). For column j, c_j is the cosine similarity
    of A's and B's column j, and s_j = (c_j + w) / 2, where w is the cosine similarity of the
    whole tensors after every column was scaled to unit length (the mean of the c_j when no
    column is zero). Then k_j = clip((s_j - min) / (max - min) - |alpha|, 0, 1) and column j of
    the result is (1 - k_j) * B + k_j * A: columns that agree more than most of the model
    stay A, dissimilar ones take B, and a larger |alpha| moves every column toward B.
    min and max come from `stats` (see `cosine_key_stat`); if max <= min every column counts
    as most similar ((s - min) / (max - min) = 1).
    """
    dots, norm_a, norm_b = _column_products(a, b)
    cos = _cosine(dots, norm_a, norm_b)
    # Columns scaled to unit length: the dot product is the sum of the column cosines and
    # each tensor's squared norm is its count of nonzero columns.
    units = torch.count_nonzero(norm_a) * torch.count_nonzero(norm_b)
    whole = cos.sum(dtype=torch.float64) / units.double().sqrt().clamp(min=EPS)
    return _lerp_columns(a, b, cos.add_(whole).div_(2), stats, abs(float(alpha)))


@merge_method("cosine_b", inputs=("a", "b"), needs_stats="cosine",
              docs={"alpha": "how far to pull toward B: subtracted from each column's "
                             "normalised similarity before clipping to [0, 1]"})
def cosine_b(a: Tensor, b: Tensor, *, alpha: float = 0.5, stats: dict) -> Tensor:
    """lerp(B, A, k), k = clip((s - min) / (max - min) - alpha, 0, 1), s from raw cosines

    supermerger's cosineB ("favors model B's structure with details from A"). As cosine_a,
    with two differences taken from supermerger: the whole-tensor term w is the plain cosine
    similarity of A and B flattened (so large columns weigh more), and alpha is subtracted as
    given, not as |alpha|. Per column j: s_j = (c_j + w) / 2,
    k_j = clip((s_j - min) / (max - min) - alpha, 0, 1), result column = (1 - k_j) * B + k_j * A.
    """
    dots, norm_a, norm_b = _column_products(a, b)
    cos = _cosine(dots, norm_a, norm_b)
    # The whole tensors' dot product and norms, from the columns' ones.
    whole = _cosine(dots.sum(dtype=torch.float64), _total_norm(norm_a), _total_norm(norm_b))
    return _lerp_columns(a, b, cos.add_(whole).div_(2), stats, float(alpha))


def cosine_key_stat(a: Tensor, b: Tensor) -> float:
    """The pre-pass value of one key for cosine_a / cosine_b: the mean over its columns of the
    cosine similarity of A's and B's columns (see cosine_a for what a column is).

    The executor takes the min and max of this over all merged keys. It is exactly the mean of
    what supermerger's cosineA pre-pass records for the key, and the mean of the per-column
    s_j cosine_a uses (for keys with no zero column). Where this differs from supermerger:
    it takes min and max over every column's value (for cosineB, (c_j + w) / 2) across the
    model after dropping the lowest and highest 1%, so its range is wider than the range of
    per-key means; one number per key is what our streaming pre-pass keeps. supermerger also
    leaves VAE keys unmerged in these modes; here that is the recipe's choice.
    """
    if a.shape != b.shape:  # inpainting-style channel mismatch: compare the common part
        window = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape, strict=True))
        a, b = a[window], b[window]
    return float(_cosine(*_column_products(a.float(), b.float())).mean())


# --- helpers ---------------------------------------------------------------------------------


def _columns(t: Tensor) -> Tensor:
    """The tensor as a (first axis, everything else) matrix; 0-dim as 1 x 1."""
    return t.reshape(t.shape[0] if t.dim() else 1, -1)


def _column_products(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per column: the dot product of A's and B's, and each one's norm (float32)."""
    cols_a, cols_b = _columns(a), _columns(b)
    return (cols_a * cols_b).sum(0), cols_a.norm(dim=0), cols_b.norm(dim=0)


def _total_norm(column_norms: Tensor) -> Tensor:
    return column_norms.double().square().sum().sqrt()


def _cosine(dot: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """dot / (|A| |B|), 0 where either is a zero vector."""
    return dot / (norm_a.clamp(min=EPS) * norm_b.clamp(min=EPS))


def _lerp_columns(a: Tensor, b: Tensor, similarity: Tensor, stats: dict,
                  shift: float) -> Tensor:
    low, high = float(stats["min"]), float(stats["max"])
    span = high - low
    # With no spread (one key, or identical models) every column counts as most similar.
    k = similarity.sub_(low).div_(span) if span > 0 else torch.ones_like(similarity)
    k = k.sub_(shift).clamp_(0, 1).to(a.dtype)
    cols_a, cols_b = _columns(a), _columns(b)
    return torch.lerp(cols_b, cols_a, k).reshape(a.shape)
