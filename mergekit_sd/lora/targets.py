"""Which checkpoint weight (and which rows of it) each LoRA module changes.

LoRA files name modules in one of three vocabularies: diffusers module paths (PEFT, kohya's SD
UNet and CLIP names with dots turned into underscores, diffusers FLUX, and LyCORIS' own
`lycoris_` names of a diffusers UNet or transformer, as SimpleTuner writes them), the
checkpoint's own layout (kohya FLUX and SD3, ai-toolkit, LyCORIS' ldm names), or XLabs'
attention processors.
The first is looked up through the key maps derived from diffusers' converters
(`arch.keymap`), which also say which rows of a fused qkv / linear1 weight a separate q, k or v
lands on; the second directly; the third through XLabs' four processor names.

Names are compared with dots turned into underscores, because that is all kohya keeps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mergekit_sd.arch.architectures import Architecture
from mergekit_sd.arch.components import slot_of
from mergekit_sd.arch.keymap import diffusers_key_maps

DIFFUSION = "diffusion_model"

# the LoRA name prefixes of each checkpoint slot, longest first where one begins another
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", DIFFUSION), ("lora_transformer_", DIFFUSION), ("lycoris_", DIFFUSION),
    ("model_diffusion_model_", DIFFUSION), ("diffusion_model_", DIFFUSION),
    ("unet_", DIFFUSION), ("transformer_", DIFFUSION),
    ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"),
    ("text_encoder_2_", "text_encoder_2"), ("text_encoder_3_", "text_encoder_3"),
    ("text_encoder_", "text_encoder"),
)
# keymap component -> checkpoint slot
_SLOT_OF_COMPONENT = {"unet": DIFFUSION, "transformer": DIFFUSION, "text_encoder": "text_encoder",
                      "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3"}
# XLabs' FLUX processors: <n>.processor.<name> -> the BFL module it adapts
_XLABS = re.compile(r"^double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])$")
_XLABS_STREAM = {"1": "img_attn", "2": "txt_attn"}


@dataclass(frozen=True, slots=True)
class Target:
    key: str  # the checkpoint weight
    rows: tuple[int, int] | None  # rows of `key` the module covers; None: all of it
    bias: str | None  # the checkpoint bias of the same rows, if there is one
    slot: str  # diffusion_model, text_encoder, ...
    block: str  # the architecture's block (BASE outside blocks; TE for text encoders)
    shape: tuple[int, ...]  # the delta's shape: `key`'s, or that of its rows


@dataclass
class Unmatched:
    """A LoRA's modules that change no weight of the base (reported, never skipped silently):
    those that name no weight of it, and those that name one but are malformed or unusable
    there (another width, no lora_up, rank 0, a dora_scale of another size, a kind of change
    nothing applies), each with the reason."""

    lora: str
    modules: list[str]  # module names that name no weight of the base
    malformed: list[str] = field(default_factory=list)  # "NAME (why)"

    @property
    def count(self) -> int:
        return len(self.modules) + len(self.malformed)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def unmatched_summary(unmatched: list[Unmatched], base: str) -> tuple[int, str]:
    """(how many modules of all the LoRAs land nowhere, what they are: "2 name no weight of
    BASE, 1 malformed or unusable")."""
    no_weight = sum(len(u.modules) for u in unmatched)
    bad = sum(len(u.malformed) for u in unmatched)
    parts = []
    if no_weight:
        parts.append(f"{no_weight} name{'s' if no_weight == 1 else ''} no weight of {base}")
    if bad:
        parts.append(f"{bad} malformed or unusable")
    return no_weight + bad, ", ".join(parts)


def _under(name: str) -> str:
    return name.replace(".", "_")


def _transformers_names(module: str) -> list[str]:
    """A bundled text encoder's module in transformers' naming (`text_model_...`, what kohya
    and PEFT use), and in transformers 5's, which drops `text_model.`."""
    name = module.removeprefix("transformer_")
    names = [name] if name != module else []
    if name.startswith("text_model_"):
        names.append(name[len("text_model_"):])
    return names


class TargetIndex:
    """Every module name a LoRA may use for a weight of one checkpoint.

    The checkpoint's own names are indexed at once; the diffusers names only when a module
    needs them (`find`) or kohya names are asked for (`kohya`), because deriving their key maps
    the first time imports diffusers and runs its converters (seconds). kohya's SDXL UNet,
    FLUX and SD3 LoRAs, and LyCORIS' ldm names, never need them."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], arch: Architecture,
                 diffusion_prefix: str):
        self.shapes = shapes
        self.arch = arch
        self.prefix = diffusion_prefix
        self._native_diffusion = arch.family != "sd"
        self.native: dict[str, dict[str, Target]] = {}
        self._native_kohya: dict[tuple[str, tuple[int, int] | None], str] = {}
        self._by_slot: dict[str, dict[str, Target]] | None = None  # diffusers names first
        self._kohya_names: dict[tuple[str, tuple[int, int] | None], str] | None = None
        for key in shapes:  # the checkpoint's own names (kohya FLUX/SD3, ai-toolkit, LyCORIS)
            if not key.endswith(".weight"):
                continue
            slot, prefix = slot_of(key)
            if slot == "other" and diffusion_prefix == "":
                slot = DIFFUSION
            if slot not in _SLOT_OF_COMPONENT.values():
                continue
            module = _under(key[len(prefix):-len(".weight")])
            rows = shapes[key][0] if shapes[key] else 1
            target = self._target(key, 0, rows, slot)
            names = self.native.setdefault(slot, {})
            names.setdefault(module, target)
            if slot != DIFFUSION:  # transformers' own names, as the diffusers maps give them
                for alias in _transformers_names(module):
                    names.setdefault(alias, target)
            if slot == DIFFUSION and self._native_diffusion:
                self._native_kohya.setdefault((key, None), self._kohya(slot, module))

    def _with_diffusers_names(self) -> None:
        """Add the names of the diffusers key maps, which take precedence over the
        checkpoint's own (as they always did: both name the same weight where both exist)."""
        by_slot: dict[str, dict[str, Target]] = {}
        # kohya's name of each target: diffusers module paths for the SD1/SD2 UNet and every
        # CLIP, the checkpoint's own names for SDXL's UNet (sd-scripts trains its own sgm
        # model) and the FLUX and SD3 transformers
        kohya: dict[tuple[str, tuple[int, int] | None], str] = {}
        for component, mapping in diffusers_key_maps(self.shapes).items():
            slot = _SLOT_OF_COMPONENT.get(component)
            if slot is None:
                continue
            names = by_slot.setdefault(slot, {})
            for name, source in mapping.items():
                if not name.endswith(".weight") or source.transposed or len(source.segments) != 1:
                    continue
                seg = source.segments[0]
                target = self._target(seg.key, seg.start, seg.stop, slot)
                module = _under(name[:-len(".weight")])
                names.setdefault(module, target)
                if slot != DIFFUSION or not self._native_diffusion:
                    kohya.setdefault((target.key, target.rows), self._kohya(slot, module))
                if module.startswith("text_model_"):  # transformers 5 drops text_model.
                    names.setdefault(module[len("text_model_"):], target)
        for slot, names in self.native.items():
            merged = by_slot.setdefault(slot, {})
            for module, target in names.items():
                merged.setdefault(module, target)
        for pair, name in self._native_kohya.items():
            kohya.setdefault(pair, name)
        self._by_slot, self._kohya_names = by_slot, kohya

    @property
    def by_slot(self) -> dict[str, dict[str, Target]]:
        if self._by_slot is None:
            self._with_diffusers_names()
        return self._by_slot

    @property
    def kohya(self) -> dict[tuple[str, tuple[int, int] | None], str]:
        if self._kohya_names is None:
            self._with_diffusers_names()
        return self._kohya_names

    def _kohya(self, slot: str, module: str) -> str:
        if slot == "text_encoder":
            prefix = "lora_te_" if self.arch.family == "sd" else "lora_te1_"
        else:
            prefix = {DIFFUSION: "lora_unet_", "text_encoder_2": "lora_te2_",
                      "text_encoder_3": "lora_te3_"}[slot]
        return prefix + module

    def _target(self, key: str, start: int, stop: int, slot: str) -> Target:
        shape = tuple(self.shapes[key])
        whole = start == 0 and stop == (shape[0] if shape else 1)
        bias = key[:-len("weight")] + "bias"
        if bias not in self.shapes:
            bias = None
        block = "TE" if slot != DIFFUSION else self.arch.block_of(key[len(self.prefix):])
        return Target(key, None if whole else (start, stop), bias, slot, block,
                      shape if whole else (stop - start, *shape[1:]))

    def find(self, module: str) -> Target | None:
        """The target of a LoRA module name, or None when this checkpoint has none."""
        xlabs = _XLABS.match(module)
        if xlabs:
            n, kind, stream = xlabs.groups()
            module = f"double_blocks.{n}.{_XLABS_STREAM[stream]}.{kind}"
            bfl = _under(module)
            return self.native.get(DIFFUSION, {}).get(bfl) or \
                self.by_slot.get(DIFFUSION, {}).get(bfl)
        name = _under(module)
        for prefix, slot in _PREFIXES:  # the checkpoint's own name, under the first prefix
            if name.startswith(prefix):
                found = self.native.get(slot, {}).get(name[len(prefix):])
                if found is not None:
                    return found
                break
        for prefix, slot in _PREFIXES:
            if name.startswith(prefix):
                found = self.by_slot.get(slot, {}).get(name[len(prefix):])
                if found is not None:
                    return found
        # unprefixed names (early diffusers files): diffusion model first
        for slot in (DIFFUSION, "text_encoder", "text_encoder_2"):
            found = self.by_slot.get(slot, {}).get(name)
            if found is not None:
                return found
        return None
