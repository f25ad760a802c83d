"""AUTOMATIC1111's merge metadata (sd_merge_recipe, sd_merge_models), which its metadata view,
Forge and Civitai show: written by `merge` (merge/provenance.py) and by `bake`, which replaces
the base's own so that a baked file never claims to be its base (light: `bake` starts with it).
"""

from __future__ import annotations

import json

# AUTOMATIC1111's names for the two methods its merger tab has
A1111_METHOD_NAMES = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}
A1111_SLOTS = ("primary", "secondary", "tertiary")  # its A, B and C


def a1111_recipe(hashes: dict[str, str | None], steps: dict[str, str], method: str,
                 multiplier: float | None, half: bool, title: str, vae: str | None,
                 variant: str | None) -> dict:
    """AUTOMATIC1111's sd_merge_recipe: `hashes` and `steps` by slot (primary, secondary,
    tertiary), the file's or the step's in that slot; the method by AUTOMATIC1111's name where
    it has one; `variant` the output's (`sd_conv_in_variant`)."""
    return {
        "type": "mergekit-sd",
        **{f"{slot}_model_hash": hashes.get(slot) for slot in A1111_SLOTS},
        **{f"{slot}_model_step": name for slot, name in steps.items()},
        "interp_method": A1111_METHOD_NAMES.get(method, method),
        "multiplier": multiplier,
        "save_as_half": half,
        "custom_name": title,
        "config_source": 0,
        "bake_in_vae": vae or "None",
        "discard_weights": "",
        "is_inpainting": variant == "inpainting",
        "is_instruct_pix2pix": variant == "instruct-pix2pix",
    }


def _parent_json(metadata: dict[str, str], key: str):
    """An input's own AUTOMATIC1111 metadata value, parsed; None when absent or damaged (not
    JSON, or nested too deeply to parse): a parent's corrupt lineage is left out."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _ancestors(metadata: dict[str, str]) -> dict[str, dict]:
    """The ancestors a file lists under sd_merge_models (SHA256 -> entry), as far as they
    have the shape AUTOMATIC1111 writes."""
    models = _parent_json(metadata, "sd_merge_models")
    if not isinstance(models, dict):
        return {}
    return {sha: entry for sha, entry in models.items() if isinstance(entry, dict)}


def a1111_models_entry(metadata: dict[str, str], name: str, sha256: str, legacy: str
                       ) -> dict[str, dict]:
    """sd_merge_models' part for one input file: its ancestors (from its own metadata), then
    itself (sha256 -> {name, legacy_hash, sd_merge_recipe}), as AUTOMATIC1111 nests them."""
    return {**_ancestors(metadata),
            sha256: {"name": name, "legacy_hash": legacy,
                     "sd_merge_recipe": _parent_json(metadata, "sd_merge_recipe")}}
