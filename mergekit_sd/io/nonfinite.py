"""NaN and ±inf in the tensors a command writes: found and reported, never written unsaid.

One NaN or infinite weight blackens every image the model makes, so `merge` and `convert`
report every tensor they write holding one, and which input holds such values there. Finding
them must not cost a pass of its own over multi-GB files: a narrowing cast already reads its
result once (`saturating_cast`), and that read tells it; only a tensor written in the dtype it
was computed or stored in needs a read for this alone (`all_finite`, a sum, about a quarter of
a weighted sum's own time on a tensor of a million values). Counting, and looking at the inputs,
happen only for a tensor that is not finite.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

_SHOWN_NAMES = 3


def all_finite(tensor) -> bool:
    """Whether every value of `tensor` is finite. NaN or ±inf in it makes its sum NaN or ±inf,
    and the sum reads it once, faster than `aminmax` (which also allocates nothing): about
    half the time; a finite tensor whose sum overflows is told apart by `aminmax`."""
    import torch

    if not tensor.numel() or not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # float8: no sum or aminmax kernels
        tensor = tensor.to(torch.float16)
    if math.isfinite(tensor.sum().item()):
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def count_nonfinite(tensor) -> tuple[int, int]:
    """(NaN values, ±inf values) in `tensor`; for a tensor known not to be finite."""
    import torch

    if tensor.element_size() == 1:
        tensor = tensor.to(torch.float16)
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


@dataclass
class NonFinite:
    """Tensors written holding NaN or ±inf: per output file (its name; "" for the only one),
    per tensor in the order met, the values' counts and the inputs that hold NaN or ±inf in
    that tensor (none: the computation made them)."""

    found: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    sources: dict[str, dict[str, dict[str, None]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, nan: int, inf: int, sources=(), output: str = "") -> None:
        with self._lock:
            counts = self.found.setdefault(output, {}).setdefault(name, [0, 0])
            counts[0] += nan
            counts[1] += inf
            held = self.sources.setdefault(output, {}).setdefault(name, {})
            held.update(dict.fromkeys(sources))

    def notes(self) -> list[str]:
        """One sentence per output that holds NaN or ±inf; outputs alike share one."""
        grouped: dict[tuple, list[str]] = {}
        for output, tensors in self.found.items():
            held = self.sources[output]
            shape = (tuple((n, *c) for n, c in tensors.items()),
                     tuple((n, *held[n]) for n in tensors))
            grouped.setdefault(shape, []).append(output)
        return [self._note(outputs[0], outputs) for outputs in grouped.values()]

    def _note(self, output: str, outputs: list[str]) -> str:
        tensors, held = self.found[output], self.sources[output]
        nan = sum(c[0] for c in tensors.values())
        inf = sum(c[1] for c in tensors.values())
        names = list(tensors)
        parts = [f"{n} {kind} value{'s' if n != 1 else ''}"
                 for n, kind in ((nan, "NaN"), (inf, "infinite")) if n]
        where = f" of {' and '.join(outputs)}" if output else ""
        sentence = (f"{' and '.join(parts)} written in {len(names)} "
                    f"tensor{'s' if len(names) != 1 else ''}{where} (one such weight "
                    f"blackens every image): {_shown(names)}")
        inputs = list(dict.fromkeys(s for n in names for s in held[n]))
        if inputs:
            sentence += (f"; {_shown(inputs, 'and')} hold{'s' if len(inputs) == 1 else ''} "
                         "NaN or infinity there")
            made = [n for n in names if not held[n]]
            if made:
                sentence += f", and the merge's arithmetic made them in {_shown(made)}"
        else:
            sentence += "; the inputs are finite there: the merge's arithmetic made them"
        return sentence


def _shown(names: list[str], last: str = "") -> str:
    if len(names) > _SHOWN_NAMES:
        return ", ".join(names[:_SHOWN_NAMES]) + " …"
    if last and len(names) > 1:
        return f"{', '.join(names[:-1])} {last} {names[-1]}"
    return ", ".join(names)
