"""Read a LoRA-family file into modules: each module's tensors by role, its alpha and algorithm.

Formats differ in how they name a module's tensors (kohya `lora_up/lora_down`, PEFT
`lora_A/lora_B`, old diffusers `.lora.up`, XLabs `.up/.down`, LyCORIS `hada_*`/`lokr_*`/`diff`);
here they become one vocabulary of roles, so the delta maths never sees a file format.
The whole LoRA is held in memory (LoRAs are small next to the checkpoints they go into).
"""

from __future__ import annotations

import json
import math
import re
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

    def key_of(self, role: str) -> str:
        """The file's name of the tensor with `role` (alpha included)."""
        for key in self.keys:
            split = split_key(key)
            if split and _ROLES.get(split[1]) == role:
                return key
        return f"{self.name} ({role})"

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


def peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """Component prefix ("" for all modules) -> the PEFT LoraConfig diffusers stored in
    `lora_adapter_metadata`. A pipeline's `save_lora_weights` writes it flat, each field under
    its component (`{"unet.lora_alpha": 16, "unet.r": 4, ...}`, read back by the prefix in
    diffusers' peft.py); a model's `save_lora_adapter` writes one config unprefixed; older
    files nest it (`{"unet": {"lora_alpha": ...}}`)."""
    text = metadata.get("lora_adapter_metadata")
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    configs: dict[str, dict] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and {"lora_alpha", "r"} & value.keys():  # nested
            configs.setdefault(key, {}).update(value)
        elif "." in key:
            prefix, field_name = key.split(".", 1)
            configs.setdefault(prefix, {})[field_name] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _number(value) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _peft_matches(pattern: str, path: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({pattern})$", path) is not None
    except re.error:  # not a pattern PEFT could have used either
        return False


def peft_alpha(module: str, rank: int | None, configs: dict[str, dict]) -> float | None:
    """The alpha PEFT scales `module` by, from the config of its component: `alpha_pattern`
    (PEFT's rule: the pattern matches the module path's end) before `lora_alpha`. With rsLoRA
    PEFT scales by alpha/sqrt(r); returned as the alpha that gives that scale over r."""
    for prefix, config in sorted(configs.items(), key=lambda item: -len(item[0])):
        if prefix and not module.startswith(prefix + "."):  # text_encoder is no text_encoder_2
            continue
        path = module[len(prefix) + 1:] if prefix else module
        alpha = _number(config.get("lora_alpha"))
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if _number(value) is not None and _peft_matches(pattern, path):
                alpha = _number(value)
                break
        if alpha is not None and config.get("use_rslora") and rank:
            alpha *= math.sqrt(rank)
        return alpha
    return None


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
    configs = peft_configs(lora.metadata)
    with SafetensorsReader(path, header) as reader:  # the mapping outlives the reader
        lora.mapped = MappedTensors(reader)
        stored = {key: lora.mapped.tensor(key) for key in header.tensors}
    for module, roles in grouped.items():
        tensors = {role: stored[key] for role, key in roles.items() if role != "alpha"}
        if not tensors:
            continue
        alpha = float(stored[roles["alpha"]].float().item()) if "alpha" in roles else None
        if alpha is None and configs:
            down = tensors.get("down")
            alpha = peft_alpha(module, down.shape[0] if down is not None else None, configs)
        suffixes = {key[len(module):] for key in roles.values()}
        lora.modules[module] = LoraModule(module, _algo(suffixes), tensors, alpha,
                                          tuple(roles.values()))
    return lora
