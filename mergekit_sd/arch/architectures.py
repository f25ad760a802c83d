"""The architectures we know, as data: display names, block maps and what the weights cannot say.

Block names follow the conventions users already know from AUTOMATIC1111's block-weight merge and
supermerger (BASE, INnn, M00, OUTnn) and extend them to FLUX (Dnn double blocks, Snn single
blocks) and SD3 (Jnn joint blocks). BASE holds every key outside the numbered blocks: the text
encoders, the VAE and the diffusion model's own embeddings and final layers, except that, as in
AUTOMATIC1111's merge-block-weighted, `time_embed`/`label_emb` count as IN00 and `out.` as the
last OUT block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockRule:
    """Keys (relative to the diffusion model prefix) matching `pattern` belong to block `name`;
    `{}` in the name takes the first captured number."""

    pattern: str  # compiled on first use by re's cache: importing stays cheap for `inspect`
    name: str

    def block(self, relative_key: str) -> str | None:
        match = re.match(self.pattern, relative_key)
        if match is None:
            return None
        return self.name.format(int(match.group(1))) if match.groups() else self.name


def _rules(*pairs: tuple[str, str]) -> tuple[BlockRule, ...]:
    return tuple(BlockRule(p, name) for p, name in pairs)


def _numbered(stem: str, count: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i:02d}" for i in range(count))


def _unet_rules(last_out: int) -> tuple[BlockRule, ...]:
    return _rules(
        (r"(?:time_embed|label_emb)\.", "IN00"),
        (r"input_blocks\.(\d+)\.", "IN{:02d}"),
        (r"middle_block\.", "M00"),
        (r"output_blocks\.(\d+)\.", "OUT{:02d}"),
        (r"out\.", f"OUT{last_out:02d}"),
    )


@dataclass(frozen=True)
class Architecture:
    id: str
    label: str
    family: str  # shared block scheme and key layout: sd, sdxl, sd3, flux
    layout: str  # single-file key layout: ldm, sgm, comfy (SD3), bfl (FLUX)
    blocks: tuple[str, ...]
    block_rules: tuple[BlockRule, ...]
    caveats: tuple[str, ...] = field(default=())

    def block_of(self, relative_key: str) -> str:
        """Block of a diffusion-model key given without its prefix; BASE when in no block."""
        for rule in self.block_rules:
            name = rule.block(relative_key)
            if name is not None:
                return name
        return "BASE"


_SD_BLOCKS = ("BASE", *_numbered("IN", 12), "M00", *_numbered("OUT", 12))
_SDXL_BLOCKS = ("BASE", *_numbered("IN", 9), "M00", *_numbered("OUT", 9))
_FLUX_BLOCKS = ("BASE", *_numbered("D", 19), *_numbered("S", 38))
_FLUX_RULES = _rules((r"double_blocks\.(\d+)\.", "D{:02d}"), (r"single_blocks\.(\d+)\.", "S{:02d}"))
_SD3_RULES = _rules((r"joint_blocks\.(\d+)\.", "J{:02d}"),)

SDXL_CAVEAT = ("Pony, Illustrious and NoobAI finetunes are SDXL by structure; only metadata or "
               "Civitai data can tell them apart")
SD2_CAVEAT = ("SD 2.x v-prediction (768-v) and epsilon (512-base) models have the same weights' "
              "shapes; the prediction type cannot be told from the file alone")

ARCHITECTURES: dict[str, Architecture] = {a.id: a for a in (
    Architecture("sd1", "SD1.x", "sd", "ldm", _SD_BLOCKS, _unet_rules(11)),
    Architecture("sd2", "SD2.x", "sd", "ldm", _SD_BLOCKS, _unet_rules(11), (SD2_CAVEAT,)),
    Architecture("sdxl", "SDXL base", "sdxl", "sgm", _SDXL_BLOCKS, _unet_rules(8), (SDXL_CAVEAT,)),
    Architecture("sdxl-refiner", "SDXL refiner", "sdxl", "sgm", _SD_BLOCKS, _unet_rules(11)),
    Architecture("sd3-medium", "SD3-Medium", "sd3", "comfy",
                 ("BASE", *_numbered("J", 24)), _SD3_RULES),
    Architecture("sd3.5-medium", "SD3.5-Medium", "sd3", "comfy",
                 ("BASE", *_numbered("J", 24)), _SD3_RULES),
    Architecture("sd3.5-large", "SD3.5-Large", "sd3", "comfy",
                 ("BASE", *_numbered("J", 38)), _SD3_RULES),
    Architecture("flux-dev", "FLUX.1-dev", "flux", "bfl", _FLUX_BLOCKS, _FLUX_RULES),
    Architecture("flux-schnell", "FLUX.1-schnell", "flux", "bfl", _FLUX_BLOCKS, _FLUX_RULES),
    Architecture("flux-fill", "FLUX.1 Fill", "flux", "bfl", _FLUX_BLOCKS, _FLUX_RULES),
)}

# Names users may type for an architecture (`mergekit-sd blocks sd15`, recipes).
ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd21": "sd2", "sd3": "sd3-medium", "sd35m":
           "sd3.5-medium", "sd35l": "sd3.5-large", "flux": "flux-dev", "schnell": "flux-schnell",
           "pony": "sdxl", "illustrious": "sdxl", "noobai": "sdxl"}


def get_architecture(name: str) -> Architecture:
    key = ALIASES.get(name.lower(), name.lower())
    try:
        return ARCHITECTURES[key]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(key, [*ARCHITECTURES, *ALIASES], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(ARCHITECTURES)
        raise KeyError(f"unknown architecture {name!r}{hint} (known: {valid})") from None


def block_range(name: str) -> list[str] | None:
    """`IN00-IN05` -> [IN00 ... IN05] (either order), as recipes and LoRA block maps write a
    run of blocks; None for anything else. Whether the blocks exist is the caller's check."""
    match = re.fullmatch(r"([A-Z]+)(\d+)\s*-\s*([A-Z]+)(\d+)", name)
    if not match or match[1] != match[3]:
        return None
    lo, hi = sorted((int(match[2]), int(match[4])))
    return [f"{match[1]}{i:02d}" for i in range(lo, hi + 1)]


def block_of_key(arch: Architecture, key: str, diffusion_prefix: str) -> str:
    """Block of a full key, given the prefix the file puts before diffusion-model keys
    ("model.diffusion_model." in single files, "" in transformer/UNet-only files)."""
    if key.startswith(diffusion_prefix):
        return arch.block_of(key[len(diffusion_prefix):])
    return "BASE"


def block_counts(arch: Architecture, keys, diffusion_prefix: str) -> dict[str, int]:
    """Keys per block, in the architecture's block order (blocks with no keys included)."""
    counts = dict.fromkeys(arch.blocks, 0)
    for key in keys:
        block = block_of_key(arch, key, diffusion_prefix)
        counts[block] = counts.get(block, 0) + 1
    return counts
