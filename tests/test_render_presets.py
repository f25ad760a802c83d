"""Sampling presets: what each gives per architecture, and the sentences for misuse."""

from __future__ import annotations

import pytest

from mergekit_sd.errors import UserError
from mergekit_sd.render.assets import scheduler_config
from mergekit_sd.render.presets import (
    PRESETS,
    SCHEDULERS,
    get_preset,
    make_scheduler,
    resolve_sampling,
)


def _sampling(preset: str, family: str, **overrides):
    return resolve_sampling(get_preset(preset), family, 25, 6.0, **overrides)


def test_the_issue_presets_exist():
    assert {"standard", "lcm", "lightning-2", "lightning-4", "lightning-8", "turbo",
            "hyper-1", "hyper-2", "hyper-4", "hyper-8", "schnell"} <= set(PRESETS)


def test_lcm_uses_the_lcm_scheduler_four_steps_guidance_one_and_the_lcm_lora():
    s = _sampling("lcm", "sdxl")
    assert (s.scheduler, s.steps, s.guidance) == ("lcm", 4, 1.0)
    assert s.lora_ref == "hf://latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors"


def test_lightning_is_euler_trailing_without_guidance():
    s = _sampling("lightning-4", "sdxl")
    assert (s.scheduler, s.steps, s.guidance) == ("euler_trailing", 4, 0.0)
    assert "sdxl_lightning_4step_lora" in s.lora_ref
    assert SCHEDULERS[s.scheduler][1] == {"timestep_spacing": "trailing"}


def test_standard_takes_the_grids_steps_and_guidance_and_any_scheduler():
    s = _sampling("standard", "sd1", scheduler="dpmpp_2m_karras")
    assert (s.scheduler, s.steps, s.guidance, s.lora_ref) == ("dpmpp_2m_karras", 25, 6.0, None)


def test_schnell_and_turbo_need_no_lora():
    assert _sampling("schnell", "flux").lora_ref is None
    assert (_sampling("turbo", "sdxl").steps, _sampling("turbo", "sdxl").guidance) == (1, 0.0)


def test_turbo_gives_each_turbo_release_the_steps_it_is_made_for():
    """SDXL-Turbo: 1 step; SD3.5-Large-Turbo: 4 (its model card), both within 1 to 4."""
    assert (_sampling("turbo", "sd3").steps, _sampling("turbo", "sd3").guidance) == (4, 0.0)
    assert _sampling("turbo", "sd3", steps=2).steps == 2
    with pytest.raises(UserError, match="--preset turbo takes 1 to 4 steps"):
        _sampling("turbo", "sd3", steps=8)


def test_hyper_8_fuses_the_flux_lora_at_the_scale_its_model_card_recommends():
    flux = _sampling("hyper-8", "flux")
    assert (flux.lora_scale, flux.guidance, flux.steps) == (0.125, 3.5, 8)
    assert _sampling("hyper-8", "sdxl").lora_scale == 1.0
    assert _sampling("hyper-8", "flux", lora_scale=0.3).lora_scale == 0.3


def test_lora_none_runs_a_distilled_candidate_without_the_presets_lora():
    assert _sampling("lightning-8", "sdxl", lora="none").lora_ref is None
    assert _sampling("lcm", "sd1", lora="my-lcm.safetensors").lora_ref == "my-lcm.safetensors"


@pytest.mark.parametrize(("preset", "family", "overrides", "message"), [
    ("lightning-4", "sd1", {}, "--preset lightning-4 is for SDXL, not SD1.x"),
    ("lcm", "sd1", {"steps": 12}, "--steps 12: --preset lcm takes 2 to 8 steps"),
    ("hyper-2", "sdxl", {"steps": 4}, "--steps 4: --preset hyper-2 takes exactly 2 steps$"),
    ("hyper-1", "sd1", {"steps": 4}, "--steps 4: --preset hyper-1 takes exactly 1 step$"),
    ("standard", "flux", {"scheduler": "euler"}, "FLUX.1 needs a flow-matching scheduler"),
    ("standard", "sdxl", {"scheduler": "eular"}, "did you mean 'euler'?"),
])
def test_misuse_is_one_sentence(preset, family, overrides, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace(".", r"\.")):
        _sampling(preset, family, **overrides)


def test_an_unknown_preset_names_the_nearest():
    with pytest.raises(UserError, match="did you mean 'lightning-4'"):
        get_preset("lighting-4")


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_every_preset_scheduler_builds_offline_for_every_family_it_serves(family):
    for preset in PRESETS.values():
        if family in preset.families:
            s = resolve_sampling(preset, family, 25, 6.0)
            scheduler = make_scheduler(s.scheduler, scheduler_config(family))
            # FLUX.1-dev shifts its schedule by the image size (mu), as its pipeline does
            shift = {"mu": 1.15} if scheduler.config.get("use_dynamic_shifting") else {}
            scheduler.set_timesteps(s.steps, **shift)
            assert len(scheduler.timesteps) >= s.steps


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_schedulers_build_from_reference_configs_without_diffusers_warnings(family):
    """No "config attributes ... were passed to TCDScheduler ... verify your
    scheduler_config.json": the user has no such file, the key is our reference config's."""
    import logging

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # diffusers' loggers hand their records up to it
    logger.addHandler(handler)
    try:
        flow = family in ("sd3", "flux")
        for name in SCHEDULERS:
            if name.startswith("flow_") == flow:
                make_scheduler(name, scheduler_config(family))
    finally:
        logger.removeHandler(handler)
    assert not [line for line in said if "scheduler_config.json" in line]
    pndm = make_scheduler("pndm", scheduler_config("sd1"))
    assert pndm.config.skip_prk_steps and pndm.config.steps_offset == 1  # what it takes, kept
