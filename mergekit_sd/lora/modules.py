"""Read a LoRA-family file into modules: each module's tensors by role, its alpha and algorithm.

Formats differ in how they name a module's tensors (kohya `lora_up/lora_down`, PEFT
`lora_A/lora_B`, old diffusers `.lora.up`, XLabs `.up/.down`, LyCORIS `hada_*`/`lokr_*`/`diff`);
here they become one vocabulary of roles, so the delta maths never sees a file format.
The whole LoRA is held in memory (LoRAs are small next to the checkpoints they go into).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.arch.lora import split_key
from mergekit_sd.errors import BadModelFile
from mergekit_sd.io.header import SafetensorsHeader, read_header
from mergekit_sd.io.mapped import MappedTensors
from mergekit_sd.io.reader import SafetensorsReader

# file suffix -> role
_ROLES = {
    ".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_A.default.weight": "down",
    ".lora.down.weight": "down", ".lora_linear_layer.down.weight": "down", ".down.weight": "down",
    ".lora_up.weight": "up", ".lora_B.weight": "up", ".lora_B.default.weight": "up",
    ".lora.up.weight": "up", ".lora_linear_layer.up.weight": "up", ".up.weight": "up",
    ".lora_mid.weight": "mid", ".alpha": "alpha",
    ".dora_scale": "dora", ".lora_magnitude_vector": "dora",
    ".hada_w1_a": "w1a", ".hada_w1_b": "w1b", ".hada_w2_a": "w2a", ".hada_w2_b": "w2b",
    ".hada_t1": "t1", ".hada_t2": "t2",
    ".lokr_w1": "w1", ".lokr_w1_a": "w1a", ".lokr_w1_b": "w1b", ".lokr_w2": "w2",
    ".lokr_w2_a": "w2a", ".lokr_w2_b": "w2b", ".lokr_t2": "t2",
    ".diff": "diff", ".diff_b": "diff_b",
}


@dataclass
class LoraModule:
    name: str  # the module's name in the file
    algo: str  # lora, loha, lokr, full
    tensors: dict[str, object]  # role -> torch tensor, in the file's dtype (cast when used)
    alpha: float | None = None
    keys: tuple[str, ...] = ()  # the file's tensor names it was read from

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "down" in t:
            return t["down"].shape[0]
        if self.algo == "loha":
            return t["w1b"].shape[0]
        if self.algo == "lokr":
            for role, dim in (("w2b", 0), ("w1b", 0), ("t2", 0)):
                if role in t:
                    return t[role].shape[dim]
        return None


@dataclass
class LoraFile:
    path: Path
    metadata: dict[str, str]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # keys that are no module tensor
    mapped: MappedTensors | None = None  # the mapping the modules' tensors view


def _algo(suffixes: set[str]) -> str:
    """The algorithm a module's suffixes belong to (LoHa and LoKr share role names)."""
    if any(s.startswith(".hada_") for s in suffixes):
        return "loha"
    if any(s.startswith(".lokr_") for s in suffixes):
        return "lokr"
    if suffixes & {".diff", ".diff_b"}:
        return "full"
    return "lora"


def _peft_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """diffusers writes PEFT's lora_alpha per component in `lora_adapter_metadata`."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    found = {}
    for prefix, config in (doc.items() if isinstance(doc, dict) else ()):
        if isinstance(config, dict) and isinstance(config.get("lora_alpha"), int | float):
            found[prefix] = float(config["lora_alpha"])
    return found


def group_modules(header: SafetensorsHeader) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The file's modules, each as role -> tensor name, and the names that belong to none;
    from the header alone (no tensor read, no torch)."""
    grouped: dict[str, dict[str, str]] = {}
    ignored = []
    for key in header.tensors:
        split = split_key(key)
        role = _ROLES.get(split[1]) if split else None
        if role is None:
            ignored.append(key)
        else:
            grouped.setdefault(split[0], {})[role] = key
    return grouped, ignored


def load_lora(path: str | Path, header: SafetensorsHeader | None = None) -> LoraFile:
    """Every module of the LoRA at `path` (whose `header` the caller may have read already).
    Tensors keep the file's dtype: a rank-64 SDXL LoRA is half a gigabyte in fp16 and would be
    a whole one in fp32; each module's factors are cast when its delta is made."""
    path = Path(path)
    header = header or read_header(path)
    grouped, ignored = group_modules(header)
    lora = LoraFile(path, dict(header.metadata), ignored=ignored)
    if not grouped:
        raise BadModelFile(path, "has no LoRA module tensors (lora_up/lora_down, lora_A/lora_B, "
                                 "hada_*, lokr_*, diff); is it a LoRA?")
    peft_alpha = _peft_alphas(lora.metadata)
    with SafetensorsReader(path, header) as reader:  # the mapping outlives the reader
        lora.mapped = MappedTensors(reader)
        stored = {key: lora.mapped.tensor(key) for key in header.tensors}
    for module, roles in grouped.items():
        tensors = {role: stored[key] for role, key in roles.items() if role != "alpha"}
        if not tensors:
            continue
        alpha = float(stored[roles["alpha"]].float().item()) if "alpha" in roles else None
        if alpha is None and peft_alpha:
            alpha = next((a for p, a in peft_alpha.items() if module.startswith(p)), None)
        suffixes = {key[len(module):] for key in roles.values()}
        lora.modules[module] = LoraModule(module, _algo(suffixes), tensors, alpha,
                                          tuple(roles.values()))
    return lora
