"""Geometric merges: spherical linear interpolation (slerp) of whole tensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergekit_sd.merge.registry import merge_method

# Beyond this |cos| the directions are treated as colinear and slerp becomes lerp: the angle
# is too small (or too close to pi) for sin(angle) to be divided by safely, and the two
# formulas agree to within about angle^2 / 8 there anyway.
COLINEAR_COS = 0.9995


@merge_method("slerp", inputs=("a", "b"),
              docs={"alpha": "position along the arc from A (0) to B (1); not clamped"})
def slerp(a: Tensor, b: Tensor, *, alpha: float = 0.5) -> Tensor:
    """(sin((1-alpha)t) A/|A| + sin(alpha t) B/|B|) / sin(t) * ((1-alpha)|A| + alpha|B|)

    Spherical linear interpolation of the tensors taken as flat vectors: the direction moves
    along the great circle from A's to B's (t is the angle between them, from their clamped
    cosine) while the length moves linearly from |A| to |B|, as in sd-mecha's and
    supermerger's slerp. Where the formula is undefined or unstable it falls back to
    (1 - alpha) * A + alpha * B: one-element and 0-dim tensors, a zero tensor on either side,
    and (nearly) parallel or opposite directions (|cos t| > 0.9995). alpha == 0 returns A and
    alpha == 1 returns B themselves.
    """
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    alpha = float(alpha)
    if a.numel() <= 1:
        return torch.lerp(a, b, alpha)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    # BLAS reductions in float32: about 1e-7 relative error on these sums, far below what the
    # angle needs outside the colinear fallback, and ten times faster than float64 sums.
    norm_a = torch.linalg.vector_norm(flat_a).item()
    norm_b = torch.linalg.vector_norm(flat_b).item()
    if norm_a == 0 or norm_b == 0:
        return torch.lerp(a, b, alpha)
    cos = torch.dot(flat_a, flat_b).item() / (norm_a * norm_b)
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > COLINEAR_COS:
        return torch.lerp(a, b, alpha)
    angle = math.acos(cos)
    length = (1 - alpha) * norm_a + alpha * norm_b
    scale = length / math.sin(angle)
    coef_a = scale * math.sin((1 - alpha) * angle) / norm_a
    coef_b = scale * math.sin(alpha * angle) / norm_b
    return torch.mul(a, coef_a).add_(b, alpha=coef_b)
