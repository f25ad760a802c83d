"""Casting floats to a narrower float dtype without inventing infinities.

A plain cast turns every value beyond the target's finite range into ±inf (fp16 above 65504,
float8_e5m2) or NaN (float8_e4m3fn in some torch versions), and one such weight poisons every
activation that reads it: the image comes out black. bf16 and fp32 weights can hold such values
legitimately, so they are clamped to the largest finite value instead (saturated), which is the
nearest the target can store, and counted, so that the user hears which tensors were touched.
NaN and ±inf already in the input are not invented by the cast: they stay, and the cast tells
its caller so (`checked_cast`), which reports them (mergekit_sd.io.nonfinite).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mergekit_sd.io.dtypes import safetensors_dtype, torch_dtype

# what users call each narrow dtype (the names --dtype and recipes take)
_USER_NAMES = {"F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2",
               "F32": "fp32"}
_SHOWN_NAMES = 3


@dataclass
class Clamped:
    """Values clamped by `saturating_cast`, per target dtype: how many, and in which tensors
    (each once; named in sorted order, since a bake's workers meet them in no fixed one)."""

    values: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, dict[str, None]] = field(default_factory=dict)
    # ±inf of the input written as the largest finite value: fp8_e4m3fn has no infinity
    infinite: dict[str, dict[str, int]] = field(default_factory=dict)
    # a bake's workers add from several threads
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, dtype: str, name: str, count: int) -> None:
        with self._lock:
            self.values[dtype] = self.values.get(dtype, 0) + count
            self.tensors.setdefault(dtype, {})[name] = None

    def add_infinite(self, dtype: str, name: str, count: int) -> None:
        with self._lock:
            per_tensor = self.infinite.setdefault(dtype, {})
            per_tensor[name] = per_tensor.get(name, 0) + count

    def notes(self) -> list[str]:
        """One sentence per target dtype that needed clamping, and per dtype that had no
        infinity for an infinite input value."""
        import torch

        said = []
        for dtype, count in self.values.items():
            names = sorted(self.tensors[dtype])
            shown = ", ".join(names[:_SHOWN_NAMES]) + (" …" if len(names) > _SHOWN_NAMES else "")
            limit = f"{torch.finfo(torch_dtype(dtype)).max:g}"
            said.append(f"{count} value{'s' if count != 1 else ''} in {len(names)} "
                        f"tensor{'s' if len(names) != 1 else ''} lay beyond "
                        f"{_USER_NAMES.get(dtype, dtype)}'s range (±{limit}) and "
                        f"{'were' if count != 1 else 'was'} clamped to it instead of becoming "
                        f"infinite: {shown}")
        for dtype, per_tensor in self.infinite.items():
            names, count = sorted(per_tensor), sum(per_tensor.values())
            shown = ", ".join(names[:_SHOWN_NAMES]) + (" …" if len(names) > _SHOWN_NAMES else "")
            limit = f"{torch.finfo(torch_dtype(dtype)).max:g}"
            said.append(f"{count} value{'s' if count != 1 else ''} in {len(names)} "
                        f"tensor{'s' if len(names) != 1 else ''} {'were' if count != 1 else 'was'}"
                        f" infinite in the input and {'are' if count != 1 else 'is'} written as "
                        f"±{limit}, as {_USER_NAMES.get(dtype, dtype)} has no infinity: {shown}")
        return said


def saturating_cast(tensor, dtype, name: str = "", clamped: Clamped | None = None):
    """`tensor` as `dtype`; a float narrowed to a float clamps the finite values beyond the
    target's range (recorded in `clamped` under `name`) instead of making them ±inf or NaN."""
    return checked_cast(tensor, dtype, name, clamped)[0]


def checked_cast(tensor, dtype, name: str = "", clamped: Clamped | None = None,
                 check: bool = False):
    """(`saturating_cast`'s result, whether it is finite). A narrowing cast reads its result
    once anyway, which tells; any other float tensor is read for this only with `check`
    (else None: not looked at). NaN and ±inf the input holds stay NaN and ±inf: a clamp would
    hide a damaged weight from every later check while it still spoils the images (the
    largest fp16 times an activation overflows fp16 again), and a widening cast keeps them
    too. Only fp8_e4m3fn, which has no infinity, gets ±448 for ±inf (counted in `clamped`)."""
    import torch

    from mergekit_sd.io.nonfinite import all_finite

    floats = tensor.is_floating_point() and dtype.is_floating_point
    narrowing = floats and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max
    if not narrowing:
        cast = tensor.to(dtype)
        if not floats:
            return cast, True
        return cast, all_finite(tensor) if check else None
    if not tensor.numel():
        return tensor.to(dtype), True
    limit = torch.finfo(dtype).max
    if dtype.itemsize > 1:
        cast = tensor.to(dtype)
        # the usual case costs one check of the cast result: aminmax reads it once and
        # allocates nothing, where isinf(...).any() made a mask and took nine times as long,
        # longer than a merge's own arithmetic; NaN makes both NaN
        low, high = torch.aminmax(cast)
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            return cast, True
    else:  # float8 (e4m3fn has no infinity to find after the cast): the source is read
        low, high = torch.aminmax(tensor)
        if bool(torch.isfinite(low) & torch.isfinite(high)) and -limit <= low and high <= limit:
            return tensor.to(dtype), True
    # compared wide: the limit in bf16 is 65536, as is fp16's 65504 rounded to bf16
    wide = tensor if tensor.dtype == torch.float64 else tensor.float()
    over = torch.isfinite(wide) & (wide.abs() > limit)
    count = int(over.sum())
    if dtype == torch.float8_e4m3fn:
        infinite = int(torch.isinf(wide).sum())
        over |= torch.isinf(wide)
        if infinite and clamped is not None:
            clamped.add_infinite(safetensors_dtype(dtype), name, infinite)
    if count and clamped is not None:
        clamped.add(safetensors_dtype(dtype), name, count)
    cast = torch.where(over, wide.clamp(-limit, limit), wide).to(dtype)
    return cast, all_finite(cast)
