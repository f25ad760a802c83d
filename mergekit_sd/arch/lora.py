"""Recognise LoRA-family files from their key names and shapes: format, base model, rank, blocks.

Every LoRA format stores per-module tensors under a module name plus a format-specific suffix;
the suffixes tell the format, the module names tell the base architecture and which blocks the
LoRA touches. Nothing here reads tensor data: alpha values live in tiny tensors whose names are
returned so a caller that wants the numbers can read just those bytes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# suffix -> the family it marks; longest suffixes are tried first
_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "lora", ".lora_up.weight": "lora", ".lora_mid.weight": "tucker",
    ".alpha": "alpha", ".dora_scale": "dora",
    ".hada_w1_a": "loha", ".hada_w1_b": "loha", ".hada_w2_a": "loha", ".hada_w2_b": "loha",
    ".hada_t1": "loha", ".hada_t2": "loha",
    ".lokr_w1": "lokr", ".lokr_w1_a": "lokr", ".lokr_w1_b": "lokr", ".lokr_w2": "lokr",
    ".lokr_w2_a": "lokr", ".lokr_w2_b": "lokr", ".lokr_t2": "lokr",
    ".diff": "diff", ".diff_b": "diff",
    ".lora_A.weight": "peft", ".lora_B.weight": "peft", ".lora_magnitude_vector": "dora",
    ".lora_A.default.weight": "peft", ".lora_B.default.weight": "peft",
    ".lora.up.weight": "diffusers-old", ".lora.down.weight": "diffusers-old",
    ".lora_linear_layer.up.weight": "diffusers-old",
    ".lora_linear_layer.down.weight": "diffusers-old",
    ".down.weight": "xlabs", ".up.weight": "xlabs",
}
# the suffix whose shape[0] is the rank and shape[1] the module's input width
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight",
                  ".lora.down.weight", ".lora_linear_layer.down.weight", ".hada_w1_b",
                  ".down.weight")

_TEXT_ENCODER_PREFIXES = {
    "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3", "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2", "text_encoder_3.": "text_encoder_3",
}

_ANY_TEXT_ENCODER = tuple(_TEXT_ENCODER_PREFIXES)

ShapeOf = Callable[[str], tuple[int, ...] | None]


@dataclass
class LoraInfo:
    format: str
    base: str | None  # architecture id
    modules: int
    ranks: dict[int, int]  # rank -> number of modules
    targets: list[str]  # diffusion_model, text_encoder, text_encoder_2 ...
    blocks: list[str]
    alpha_keys: list[str]
    dora: bool = False
    evidence: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return max(self.ranks, key=lambda r: (self.ranks[r], r)) if self.ranks else None


def split_key(key: str) -> tuple[str, str] | None:
    """(module, suffix) when the key ends with a LoRA suffix, the longest matching suffix first.
    This runs for every key of every file a catalog scan identifies: the suffixes nearly every
    real LoRA key ends with are found with one or two `rpartition`s, the rest by looking up the
    key's last one to three dotted parts."""
    head, _, last = key.rpartition(".")
    if last == "alpha":
        return head, ".alpha"
    if last == "weight":
        module, _, kind = head.rpartition(".")
        suffix = _WEIGHT_SUFFIXES.get(kind)
        if suffix is not None:
            return module, suffix
    dots = []
    end = len(key)
    for _ in range(3):
        end = key.rfind(".", 0, end)
        if end < 0:
            break
        dots.append(end)
    for dot in reversed(dots):
        suffix = key[dot:]
        family = _SUFFIXES.get(suffix)
        if family is None:
            continue
        module = key[:dot]
        if family == "xlabs" and not re.search(_XLABS_MODULE, module):
            continue
        return module, suffix
    return None


# "<module>.<kind>.weight" suffixes that no longer suffix ends with (".lora.up.weight" does end
# with ".up.weight", so "up"/"down" are not here)
_WEIGHT_SUFFIXES = {kind: f".{kind}.weight"
                    for kind in ("lora_down", "lora_up", "lora_mid", "lora_A", "lora_B")}
_XLABS_MODULE = r"_lora\d$"


def detect_lora(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> LoraInfo | None:
    """LoRA facts for a file whose keys (with shapes) are given, or None if it is no LoRA."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    misses = 0
    for key, shape in shapes.items():
        split = split_key(key)
        if split is None:
            misses += 1
            if misses > 0.1 * len(shapes):  # a checkpoint: stop early, no LoRA is this mixed
                return None
            continue
        modules.setdefault(split[0], {})[split[1]] = shape
    weight_modules = {m: s for m, s in modules.items() if set(s) - {".alpha"}}
    # A real LoRA is (almost) nothing but LoRA tensors; a checkpoint never is.
    if not weight_modules or sum(len(s) for s in modules.values()) < 0.9 * len(shapes):
        return None
    families = Counter(_SUFFIXES[suf] for parts in weight_modules.values() for suf in parts)
    text = "\n".join(weight_modules)  # one regex scan over all names instead of one per name
    fmt, dora = _format(weight_modules, families, text)
    base, evidence, caveats = _base(weight_modules, metadata, text)
    ranks = Counter(_rank(parts) for parts in weight_modules.values())
    ranks.pop(None, None)
    targets = sorted({_target(m) for m in weight_modules})
    blocks = sorted(_blocks_touched(text, base), key=_block_sort_key)
    alpha_keys = sorted(m + ".alpha" for m, parts in modules.items() if ".alpha" in parts)
    evidence.insert(0, f"{len(weight_modules)} modules with {', '.join(sorted(families))} "
                       f"tensors: {fmt}")
    return LoraInfo(fmt, base, len(weight_modules), dict(ranks), targets, blocks, alpha_keys,
                    dora, evidence, caveats)


def _format(modules: dict[str, dict], families: Counter, text: str) -> tuple[str, bool]:
    dora = families["dora"] > 0
    names = list(modules)
    if families["xlabs"]:
        return "XLabs FLUX LoRA", dora
    if families["loha"]:
        return "LyCORIS LoHa", dora
    if families["lokr"]:
        return "LyCORIS LoKr", dora
    if families["diff"] and not families["lora"]:
        return "full diff (LyCORIS)", dora
    if families["peft"]:
        if any(n.startswith("diffusion_model.") for n in names):
            return "ai-toolkit (ComfyUI) LoRA", dora
        return "diffusers/PEFT LoRA", dora
    if families["diffusers-old"]:
        return "diffusers LoRA (attention processors)", dora
    conv = any(len(parts.get(".lora_down.weight", ())) == 4 and
               parts[".lora_down.weight"][2:] != (1, 1) for parts in modules.values())
    conv = conv or re.search(r"resnets|in_layers|out_layers|conv", text) is not None
    kind = "LoCon (Tucker)" if families["tucker"] else "LoCon" if conv else "LoRA"
    # LyCORIS outside sd-scripts (SimpleTuner) names modules lycoris_<diffusers path>
    lycoris = text.startswith("lycoris_") or "\nlycoris_" in text
    trainer = "LyCORIS" if lycoris else "kohya"
    return f"{trainer} {kind}" + (" with DoRA" if dora else ""), dora


def _rank(parts: dict[str, tuple[int, ...]]) -> int | None:
    for suffix in _DOWN_SUFFIXES:
        if suffix in parts and parts[suffix]:
            return parts[suffix][0]
    # LoKr: w?_b is [rank, in] in both of LyCORIS' layouts, where w?_a is [out, rank], or
    # [rank, out] beside a Tucker core t2 [rank, rank, kh, kw]
    for suffix in (".lokr_t2", ".lokr_w2_b", ".lokr_w1_b"):
        if parts.get(suffix):
            return parts[suffix][0]
    return None


def _input_width(parts: dict[str, tuple[int, ...]]) -> int | None:
    for suffix in _DOWN_SUFFIXES:
        shape = parts.get(suffix)
        if shape and len(shape) >= 2:
            return shape[1]
    return None


def _target(module: str) -> str:
    if not module.startswith(_ANY_TEXT_ENCODER):
        return "diffusion_model"
    for prefix, target in _TEXT_ENCODER_PREFIXES.items():
        if module.startswith(prefix):
            return target
    return "diffusion_model"


_FLUX_NAMES = (r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d")
_SD3_NAMES = (r"joint_blocks[._]\d|context_block|x_block")
_SDXL_UNET_NAMES = (r"lora_unet_(input_blocks|output_blocks|middle_block)_|"
                              r"down_blocks[._]2[._]attentions[._]\d[._]transformer_blocks[._][1-9]")
_TE_LAYER = (r"^(?:lora_te_|text_encoder\.)text_model[._]encoder[._]layers[._](\d+)")
# modules whose input width is the text encoder's: cross-attention keys, text encoder queries
_CROSS_ATTENTION_INPUTS = ("attn2.to_k", "attn2_to_k", "self_attn.q_proj", "self_attn_q_proj")
_BASE_METADATA = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl", "flux1": "flux-dev",
                  "sd3": "sd3-medium"}


def _mentions(text: str, pattern: str, *words: str) -> bool:
    """Whether `pattern` occurs in the module names; the regex scans only when a plain
    substring search, many times faster, finds a word every match contains."""
    return any(w in text for w in words) and re.search(pattern, text, re.M) is not None


def _base(modules: dict[str, dict], metadata: dict[str, str], text: str
          ) -> tuple[str | None, list[str], list[str]]:
    said = metadata.get("ss_base_model_version", "")
    evidence: list[str] = []
    caveats: list[str] = []
    if _mentions(text, _FLUX_NAMES, "double_blocks", "single_") or ".processor." in text:
        caveats.append("a FLUX LoRA fits FLUX.1-dev and schnell alike")
        return "flux-dev", ["module names of FLUX double/single blocks"], caveats
    if (_mentions(text, _SD3_NAMES, "joint_blocks", "context_block", "x_block")
            or _mentions(text, r"^transformer\.transformer_blocks\.", "transformer.transformer")):
        return "sd3-medium", ["module names of SD3 joint blocks"], caveats
    if _mentions(text, r"^(?:lora_te1_|lora_te2_|text_encoder_2\.)", "lora_te1_", "lora_te2_",
                 "text_encoder_2."):
        return "sdxl", ["two text encoders (te1/te2): SDXL"], caveats
    if _mentions(text, _SDXL_UNET_NAMES, "lora_unet_", "down_blocks"):
        return "sdxl", ["SDXL UNet module names"], caveats
    widths = Counter()
    for name, parts in modules.items():
        if name.endswith(_CROSS_ATTENTION_INPUTS):
            widths[_input_width(parts)] += 1
    for width, arch in ((2048, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if widths[width]:
            evidence.append(f"text features {width} wide: {arch}")
            return arch, evidence, caveats
    depth = max((int(m[1]) + 1 for m in re.finditer(_TE_LAYER, text, re.M)), default=0)
    if depth > 12:  # CLIP-L has 12 layers, SD2's OpenCLIP-H 24 (LoRAs train the first 23)
        return "sd2", [f"text encoder with {depth} layers: OpenCLIP-H, SD2"], caveats
    if said in _BASE_METADATA:
        return _BASE_METADATA[said], [f"ss_base_model_version says {said}"], caveats
    if modules:
        caveats.append("SD1 and SD2 could not be told apart from the shapes; assumed SD1")
        return "sd1", ["UNet/text-encoder module names of SD1/SD2"], caveats
    return None, evidence, caveats


_SD_BLOCK_PATTERNS = (
    ((r"input_blocks[._](\d+)"), lambda m: f"IN{int(m[1]):02d}"),
    ((r"output_blocks[._](\d+)"), lambda m: f"OUT{int(m[1]):02d}"),
    ((r"middle_block|mid_block"), lambda m: "M00"),
    ((r"down_blocks[._](\d+)[._](?:attentions|resnets)[._](\d+)"),
     lambda m: f"IN{1 + 3 * int(m[1]) + int(m[2]):02d}"),
    ((r"down_blocks[._](\d+)[._]downsamplers"), lambda m: f"IN{3 + 3 * int(m[1]):02d}"),
    ((r"up_blocks[._](\d+)[._](?:attentions|resnets)[._](\d+)"),
     lambda m: f"OUT{3 * int(m[1]) + int(m[2]):02d}"),
    ((r"up_blocks[._](\d+)[._]upsamplers"), lambda m: f"OUT{3 * int(m[1]) + 2:02d}"),
)
# Outside the numbered blocks, as the block-weight tools count them (and as `bake` applies
# block strengths): the input conv and the time / label embeddings are IN00, the output conv
# and its norm the last OUT block.
_SD_EDGE_IN = re.compile(r"conv_in|time_embed|label_emb|add_embedding")
_SD_EDGE_OUT = re.compile(r"(?:^|lora_unet_|lycoris_|unet\.|diffusion_model\.)"
                          r"(?:conv_out|conv_norm_out|out[._][02])(?:[._]|$)")
_DIT_BLOCK_PATTERNS = (
    ((r"single_(?:transformer_)?blocks[._](\d+)"), lambda m: f"S{int(m[1]):02d}"),
    ((r"joint_blocks[._](\d+)"), lambda m: f"J{int(m[1]):02d}"),
    ((r"(?:double_blocks|transformer_blocks)[._](\d+)"), None),
)


def block_of_module(module: str, base: str | None) -> str | None:
    """The block (INnn, M00, OUTnn, Dnn, Snn, Jnn, BASE) a LoRA module name touches."""
    if _target(module) != "diffusion_model":
        return "BASE"
    if base and base.startswith(("flux", "sd3")):
        for pattern, name in _DIT_BLOCK_PATTERNS:
            match = re.search(pattern, module)
            if match:
                if name is None:
                    stem = "D" if base.startswith("flux") else "J"
                    return f"{stem}{int(match[1]):02d}"
                return name(match)
        return "BASE"
    for pattern, name in _SD_BLOCK_PATTERNS:
        match = re.search(pattern, module)
        if match:
            return name(match)
    if _SD_EDGE_IN.search(module):
        return "IN00"
    if _SD_EDGE_OUT.search(module):
        return "OUT08" if base and base.startswith("sdxl") else "OUT11"
    return "BASE"


def _blocks_touched(names: str, base: str | None) -> set[str]:
    """The blocks touched by the LoRA modules named one per line in `names`. Each line is cut
    to its block-level stem in one regex pass, so a block's dozens of modules are looked at
    once; lines without a stem (text encoder modules and the like) stay whole."""
    blocks: set[str] = set()
    for stem in set(_BLOCK_STEM.findall(names)):
        if stem.startswith(_ANY_TEXT_ENCODER):
            blocks.add("BASE")
            continue
        block = block_of_module(stem, base)
        if block:
            blocks.add(block)
    return blocks


# a module name up to its block number ("lora_unet_input_blocks_4_1_", ...), or the whole name
_BLOCK_STEM = re.compile(r"^(?:.*?(?:blocks?|attentions|resnets|samplers)[._]\d+[._](?:\d+[._])?"
                         r"(?:(?:attentions|resnets|upsamplers|downsamplers)[._]\d+[._])?|.*)",
                         re.M)


def _block_sort_key(name: str) -> tuple[int, int]:
    order = {"BASE": 0, "IN": 1, "M": 2, "OUT": 3, "D": 4, "S": 5, "J": 6}
    stem = name.rstrip("0123456789")
    digits = name[len(stem):]
    return order.get(stem, 9), int(digits) if digits else 0


def trigger_words(metadata: dict[str, str], limit: int = 8) -> list[str]:
    """Most frequent training tags from kohya's ss_tag_frequency (or modelspec.trigger_phrase)."""
    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase:
        return [p.strip() for p in phrase.split(",") if p.strip()][:limit]
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    totals: Counter = Counter()
    if isinstance(frequency, dict):
        for tags in frequency.values():
            if isinstance(tags, dict):
                totals.update({str(t).strip(): c for t, c in tags.items()
                               if isinstance(c, int)})
    return [tag for tag, _ in totals.most_common(limit) if tag]
