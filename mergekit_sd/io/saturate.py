"""Casting floats to a narrower float dtype without inventing infinities.

A plain cast turns every value beyond the target's finite range into ±inf (fp16 above 65504,
float8_e5m2) or NaN (float8_e4m3fn in some torch versions), and one such weight poisons every
activation that reads it: the image comes out black. bf16 and fp32 weights can hold such values
legitimately, so they are clamped to the largest finite value instead (saturated), which is the
nearest the target can store, and counted, so that the user hears which tensors were touched.
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
    (in the order met, each once)."""

    values: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, dict[str, None]] = field(default_factory=dict)
    # a bake's workers add from several threads
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, dtype: str, name: str, count: int) -> None:
        with self._lock:
            self.values[dtype] = self.values.get(dtype, 0) + count
            self.tensors.setdefault(dtype, {})[name] = None

    def notes(self) -> list[str]:
        """One sentence per target dtype that needed clamping."""
        import torch

        said = []
        for dtype, count in self.values.items():
            names = list(self.tensors[dtype])
            shown = ", ".join(names[:_SHOWN_NAMES]) + (" …" if len(names) > _SHOWN_NAMES else "")
            limit = f"{torch.finfo(torch_dtype(dtype)).max:g}"
            said.append(f"{count} value{'s' if count != 1 else ''} in {len(names)} "
                        f"tensor{'s' if len(names) != 1 else ''} lay beyond "
                        f"{_USER_NAMES.get(dtype, dtype)}'s range (±{limit}) and "
                        f"{'were' if count != 1 else 'was'} clamped to it instead of becoming "
                        f"infinite: {shown}")
        return said


def saturating_cast(tensor, dtype, name: str = "", clamped: Clamped | None = None):
    """`tensor` as `dtype`; a float narrowed to a float clamps what lies beyond the target's
    finite range (recorded in `clamped` under `name`) instead of making it ±inf or NaN."""
    import torch

    if tensor.dtype == dtype:
        return tensor
    narrowing = (tensor.is_floating_point() and dtype.is_floating_point
                 and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max)
    if not narrowing:
        return tensor.to(dtype)
    limit = torch.finfo(dtype).max
    if dtype.itemsize > 1:
        cast = tensor.to(dtype)
        # the usual case costs one check of the cast result (float8_e4m3fn has no inf to
        # check): aminmax reads it once and allocates nothing, where isinf(...).any() made a
        # mask and took nine times as long, longer than a merge's own arithmetic
        if not cast.numel():
            return cast
        low, high = torch.aminmax(cast)
        if not (torch.isinf(low) or torch.isinf(high)):
            return cast
    over = int((tensor.abs() > limit).sum())
    if over and clamped is not None:
        clamped.add(safetensors_dtype(dtype), name, over)
    return tensor.float().clamp(-limit, limit).to(dtype) if over else tensor.to(dtype)
