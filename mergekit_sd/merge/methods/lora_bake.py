"""The `bake_lora` recipe step: its input plus the deltas of the step's LoRAs.

The deltas depend on the key (which module of which LoRA lands on it), so the executor adds
them after this function returns its input (see `mergekit_sd.lora.bake.apply_loras`); the LoRAs
are listed under the step's `loras`, not as tensor inputs. Whole tensors, never pieces: a
delta is made for the whole weight.
"""

from __future__ import annotations

from torch import Tensor

from mergekit_sd.merge.registry import merge_method


@merge_method("bake_lora", inputs=("model",))
def bake_lora(model: Tensor) -> Tensor:
    """model + Σ strength · ΔW of each LoRA in the step's `loras`"""
    return model
