"""What a merged file says about itself: modelspec (with the facts about the kind of model that
every input agrees on, `merge.facts`), AUTOMATIC1111's merge keys, our recipe.

The recipe stored under `mergekit_sd.recipe` is canonical (sweeps resolved to the candidate's
values, inputs pinned by SHA256, relative paths relative to the file's own folder, no output
path), so `mergekit-sd recipe extract` gives back a recipe that reproduces the file byte for
byte.
"""

from __future__ import annotations

import datetime as dt
import json

from mergekit_sd import __version__
from mergekit_sd.arch.diffusion import SD_CONV_IN_KEYS, sd_conv_in_variant
from mergekit_sd.merge.a1111 import A1111_SLOTS, a1111_models_entry, a1111_recipe
from mergekit_sd.merge.plan import VAE_SOURCE, MergePlan
from mergekit_sd.merge.registry import unrecorded_draws
from mergekit_sd.recipe.params import Candidate
from mergekit_sd.recipe.refs import recorded_ref
from mergekit_sd.recipe.schema import ParamSpec

MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
    "sdxl": "stable-diffusion-xl-v1-base", "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
    "sd3-medium": "stable-diffusion-3-medium", "sd3.5-medium": "stable-diffusion-3.5-medium",
    "sd3.5-large": "stable-diffusion-3.5-large", "flux-dev": "flux-1-dev",
    "flux-schnell": "flux-1-schnell", "flux-fill": "flux-1-fill",
}


def _param_json(value):
    if isinstance(value, ParamSpec):
        return value.model_dump(exclude_defaults=True)
    return value


def canonical_recipe(plan: MergePlan, cand: Candidate, hashes: dict[str, str]) -> dict:
    recipe = plan.loaded.recipe
    output = recipe.output
    folder = plan.outputs[cand.name].parent
    doc = {
        "version": 1,
        "models": {name: {"ref": recorded_ref(planned.ref, planned.path, folder),
                          "sha256": hashes[name]}
                   for name, planned in (*((n, plan.inputs[n]) for n in plan.model_order),
                                         *plan.loras.items())},
        "steps": [_step_json(sp, cand) for sp in plan.steps],
        "output": {"step": recipe.final_step.name, "dtype": output.dtype,
                   "drop_ema": output.drop_ema, "inference_only": output.inference_only,
                   "title": output.title or cand.name, "date": merge_date(plan)},
    }
    if plan.vae is not None:
        doc["output"]["vae"] = recorded_ref(plan.vae.ref, plan.vae.path, folder)
        doc["output"]["vae_sha256"] = hashes[VAE_SOURCE]
    return doc


def _step_json(sp, cand: Candidate) -> dict:
    params = {p: _param_json(cand.value_of(sp.step.name, p, v))
              for p, v in sp.step.params.items()}
    # the seed (and the like) a stochastic step drew with, even when left at the default
    params.update(unrecorded_draws(sp.method, sp.params[cand.name]))
    doc = {"name": sp.step.name, "method": sp.method.name, "inputs": sp.step.inputs,
           "params": params}
    if sp.step.loras:
        doc["loras"] = [lora.model_dump(exclude_none=True) for lora in sp.step.loras]
        if sp.step.allow_unmatched:
            doc["allow_unmatched"] = True
    return doc


def merge_date(plan: MergePlan) -> str:
    return plan.loaded.recipe.output.date or dt.datetime.now(dt.UTC).date().isoformat()


def _a1111_recipe(plan: MergePlan, cand: Candidate, hashes: dict[str, str]) -> dict:
    """AUTOMATIC1111's sd_merge_recipe for the final step. Its A/B/C slots are that step's
    inputs in order; an input that is an earlier step is no file, so its slot has no hash
    and `<slot>_model_step` names the step (AUTOMATIC1111 ignores keys it does not know)."""
    final = plan.steps[-1]
    slots = dict(zip(A1111_SLOTS, final.step.inputs, strict=False))
    params = final.params[cand.name]
    alpha = params.get("alpha")
    return a1111_recipe(
        {slot: hashes.get(name) for slot, name in slots.items() if name in plan.inputs},
        {slot: name for slot, name in slots.items() if name not in plan.inputs},
        final.method.name, alpha.default if alpha is not None and alpha.is_constant else None,
        plan.loaded.recipe.output.dtype == "fp16", plan.loaded.recipe.output.title or cand.name,
        plan.vae.path.name if plan.vae else None, _output_variant(plan))


def _output_variant(plan: MergePlan) -> str | None:
    """What the output's own conv_in makes it (inpainting, instruct-pix2pix), whatever its
    inputs were: a plain first input gives a plain model, the others' extra channels dropped."""
    conv_in = {plan.diffusion_prefix + key for key in SD_CONV_IN_KEYS}
    shape = next((t.out.shape for t in plan.tasks if t.key in conv_in), ())
    return sd_conv_in_variant(shape)


def _a1111_models(plan: MergePlan, hashes: dict[str, str], legacy: dict[str, str]) -> dict:
    """sha256 -> {name, legacy_hash, sd_merge_recipe}, ancestors included as AUTOMATIC1111 does."""
    models: dict = {}
    for name in plan.model_order:
        planned = plan.inputs[name]
        models.update(a1111_models_entry(planned.header.metadata, planned.path.name,
                                          hashes[name], legacy[name]))
    return models


def merge_metadata(plan: MergePlan, cand: Candidate, hashes: dict[str, str],
                   legacy: dict[str, str]) -> dict[str, str]:
    recipe = canonical_recipe(plan, cand, hashes)
    return {
        **plan.carried,  # what kind of model it is, as every input says (prediction type ...)
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE.get(plan.arch.id, plan.arch.id),
        "modelspec.title": recipe["output"]["title"],
        "modelspec.date": recipe["output"]["date"],
        "modelspec.merged_from": ", ".join(plan.inputs[n].path.name for n in plan.model_order),
        "sd_merge_recipe": json.dumps(_a1111_recipe(plan, cand, hashes)),
        "sd_merge_models": json.dumps(_a1111_models(plan, hashes, legacy)),
        "mergekit_sd.recipe": json.dumps(recipe, sort_keys=True),
        "mergekit_sd.version": __version__,
        "format": "pt",
    }
