"""The weight change each LoRA-family module stands for, at strength 1.

    LoRA / LoCon   ΔW = (alpha / rank) · up @ down            (conv: flattened, reshaped back)
    Tucker LoCon   ΔW[o,i,h,w] = (alpha / rank) · Σ up[o,a] · mid[a,b,h,w] · down[b,i]
    LoHa           ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b)   (Tucker cores t1, t2)
    LoKr           ΔW = scale · kron(w1, w2), either factor possibly low-rank (w?a @ w?b) or a
                   Tucker core; scale = alpha / rank, or 1 when both factors are stored whole
    full (diff)    ΔW = diff, Δb = diff_b
    DoRA           W' = m · (W + ΔW) / ‖W + ΔW‖ per output channel (m = dora_scale), and a
                   strength s below 1 blends: W + s · (W' − W), as ComfyUI and LyCORIS do.

alpha defaults to the rank (scale 1), which is what kohya's scripts and PEFT mean by no alpha
(kohya also reads an alpha of 0 so).
"""

from __future__ import annotations

from mergekit_sd.lora.modules import LoraModule


class DeltaShapeError(ValueError):
    """The module's tensors do not make a delta of the target's shape."""


def _tucker(core, left, right):
    """Rebuild a Tucker-factored kernel: core [r, r, kh, kw], left [r, out], right [r, in]."""
    import torch

    return torch.einsum("i j k l, j r, i p -> p r k l", core, right, left).contiguous()


def _scale(module: LoraModule, rank: int | None) -> float:
    # kohya: an alpha of 0 (or none) means alpha = rank, i.e. no scaling
    if not module.alpha or not rank:
        return 1.0
    return module.alpha / rank


def _fp32(m: LoraModule) -> dict:
    return {role: tensor.float() for role, tensor in m.tensors.items()}


def _lora(m: LoraModule, shape: tuple[int, ...]):
    import torch

    t = _fp32(m)
    up, down = t["up"].flatten(1), t["down"].flatten(1)
    if "mid" in t:
        delta = torch.einsum("a b h w, o a, b i -> o i h w", t["mid"], up, down)
    else:
        delta = up @ down
    return delta.reshape(shape) * _scale(m, t["down"].shape[0])


def _loha(m: LoraModule, shape: tuple[int, ...]):
    t = _fp32(m)
    if "t1" in t:
        w1 = _tucker(t["t1"], t["w1a"], t["w1b"])
        w2 = _tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        w1, w2 = t["w1a"] @ t["w1b"], t["w2a"] @ t["w2b"]
    return (w1 * w2).reshape(shape) * _scale(m, t["w1b"].shape[0])


def _lokr(m: LoraModule, shape: tuple[int, ...]):
    import torch

    t = _fp32(m)
    rank = None
    if "w1" in t:
        w1 = t["w1"]
    else:
        w1, rank = t["w1a"] @ t["w1b"], t["w1b"].shape[0]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2, rank = _tucker(t["t2"], t["w2a"], t["w2b"]), t["w2b"].shape[0]
    else:
        w2, rank = t["w2a"] @ t["w2b"], t["w2b"].shape[0]
    if w2.ndim == 4:  # a conv kernel: w1 acts on the channel dims only
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (_scale(m, rank) if rank else 1.0)


_BUILDERS = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def module_delta(module: LoraModule, shape: tuple[int, ...]):
    """ΔW of `module` (fp32) in the target weight's `shape`, at strength 1."""
    import math

    if module.algo == "full":
        delta = module.tensors.get("diff")
        if delta is None:
            return None
        if delta.numel() != math.prod(shape):
            raise DeltaShapeError(f"diff has shape {tuple(delta.shape)}, the target {shape}")
        return delta.float().reshape(shape)
    try:
        return _BUILDERS[module.algo](module, shape)
    except (RuntimeError, KeyError, IndexError, ZeroDivisionError) as exc:  # malformed
        found = {role: tuple(v.shape) for role, v in module.tensors.items()}
        raise DeltaShapeError(f"{module.algo} tensors {found} do not make a delta of shape "
                              f"{shape} ({exc})") from None


def apply_dora(weight, delta, magnitude, strength: float):
    """DoRA's merge of `delta` (strength 1, alpha applied) into `weight`, blended by strength."""
    merged = weight + delta
    magnitude = magnitude.float()
    out = weight.shape[0]
    if magnitude.shape[0] == out and magnitude.numel() == out:
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, *([1] * (weight.ndim - 1)))
        magnitude = magnitude.reshape(norm.shape)
    else:  # LyCORIS' wd_on_output=False: one magnitude per input channel
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, merged.shape[1], *([1] * (weight.ndim - 2)))
        magnitude = magnitude.reshape(norm.shape)
    decomposed = merged * (magnitude / norm)
    return weight + strength * (decomposed - weight)
