"""Write a kohya-format LoRA (lora_up / lora_down / alpha per module), as extract and merge do.

kohya's format is the one every UI and trainer reads; alpha is written equal to each module's
rank, so the stored factors carry the whole delta (scale 1).
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_sd import __version__
from mergekit_sd.arch.architectures import Architecture
from mergekit_sd.io.dtypes import USER_DTYPES, safetensors_dtype, torch_dtype
from mergekit_sd.io.saturate import Clamped, saturating_cast
from mergekit_sd.io.writer import StreamingWriter, TensorSpec
from mergekit_sd.merge.provenance import MODELSPEC_ARCHITECTURE

# what sd-scripts writes as ss_base_model_version
_BASE_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}


def factors_for(up, down, kernel: tuple[int, ...]):
    """(lora_up, lora_down) tensors from 2-D factors: conv weights keep their 4-D shapes."""
    if kernel:
        return (up.reshape(*up.shape, 1, 1),
                down.reshape(down.shape[0], -1, *kernel))
    return up, down


def write_kohya_lora(path: Path, modules: dict[str, tuple], arch: Architecture, dtype: str,
                     provenance: dict[str, str], clamped: Clamped | None = None) -> Path:
    """`modules`: kohya name -> (lora_up, lora_down) fp32 tensors; written atomically. Factor
    values beyond the range of `dtype` are clamped to it (counted in `clamped`), never
    written as infinities."""
    import torch

    factor_dtype = torch_dtype(USER_DTYPES[dtype])
    tensors: dict[str, object] = {}
    ranks = []
    for name in sorted(modules):
        up, down = modules[name]
        rank = down.shape[0]
        ranks.append(rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        for role, factor in (("lora_down", down), ("lora_up", up)):
            key = f"{name}.{role}.weight"
            tensors[key] = saturating_cast(factor, factor_dtype, key, clamped).contiguous()
    dim = max(ranks, default=0)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_base_model_version": _BASE_VERSIONS.get(arch.family, arch.family),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE.get(arch.id, arch.id) + "/lora",
        "modelspec.title": path.stem,
        "mergekit_sd.version": __version__,
        "format": "pt",
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()},
    }
    specs = [TensorSpec(name, safetensors_dtype(t.dtype), tuple(t.shape))
             for name, t in tensors.items()]
    with StreamingWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return path
