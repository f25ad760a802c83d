"""Sampling presets: few-step samplers (LCM, SDXL-Lightning, SDXL-Turbo, Hyper-SD, FLUX.1-schnell)
and `standard` (any scheduler, the grid's steps and guidance), each with the scheduler, steps,
guidance and distillation LoRA its makers recommend.

A preset's LoRA is a reference (a path, a catalog name or `hf://org/repo/file`); the defaults
name the official releases. Distilled candidates (a Lightning UNet, a merge with LCM baked in)
need no LoRA: `--lora none`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from mergekit_sd.errors import UserError
from mergekit_sd.render.layout import FAMILY_LABELS

# scheduler name -> (diffusers class, settings over the family's reference config, A1111 name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "Euler"),
    "euler_a_trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"},
                         "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}, "DDIM"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True},
                        "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lcm": ("LCMScheduler", {}, "LCM"),
    "tcd": ("TCDScheduler", {}, "TCD"),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
}
FLOW_FAMILIES = ("sd3", "flux")  # rectified-flow models take flow-matching schedulers only
DEFAULT_SCHEDULER = {"sd1": "euler_a", "sdxl": "euler_a", "sd3": "flow_euler",
                     "flux": "flow_euler"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    families: tuple[str, ...]
    scheduler: str | None  # None: --scheduler or the family's default
    steps: int | None  # None: the grid's
    step_range: tuple[int, int] = (1, 200)
    guidance: float | None = None  # None: the grid's
    loras: dict[str, str] = field(default_factory=dict)  # family -> default LoRA reference
    lora_scale: float = 1.0
    guidance_by_family: dict[str, float] = field(default_factory=dict)
    scheduler_by_family: dict[str, str] = field(default_factory=dict)
    steps_by_family: dict[str, int] = field(default_factory=dict)
    lora_scale_by_family: dict[str, float] = field(default_factory=dict)


_HYPER = "hf://ByteDance/Hyper-SD/"


def _hyper(steps: int) -> Preset:
    plural = "step" if steps == 1 else "steps"
    loras = {"sd1": f"{_HYPER}Hyper-SD15-{steps}{plural}-lora.safetensors",
             "sdxl": f"{_HYPER}Hyper-SDXL-{steps}{plural}-lora.safetensors"}
    families: tuple[str, ...] = ("sd1", "sdxl")
    if steps == 8:
        loras["flux"] = f"{_HYPER}Hyper-FLUX.1-dev-8steps-lora.safetensors"
        families += ("flux",)
    # FLUX: ByteDance's model card (news of Aug. 26, 2024) recommends "LoRA scales around
    # 0.125 that is adaptive with training" with guidance kept at 3.5; at 1.0 the delta is
    # eight times what the LoRA was trained for. The SD1.x/SDXL LoRAs are fused at 1.0.
    return Preset(f"hyper-{steps}", f"Hyper-SD {steps}-step LoRA, guidance 0 (FLUX 3.5, LoRA "
                  "scale 0.125)", families, "tcd" if steps == 1 else "ddim_trailing", steps,
                  (steps, steps), 0.0, loras, lora_scale=1.0, guidance_by_family={"flux": 3.5},
                  scheduler_by_family={"flux": "flow_euler"},
                  lora_scale_by_family={"flux": 0.125})


def _lightning(steps: int) -> Preset:
    return Preset(f"lightning-{steps}", f"SDXL-Lightning {steps}-step LoRA (or a Lightning "
                  "UNet with --lora none), Euler with trailing timesteps, guidance 0",
                  ("sdxl",), "euler_trailing", steps, (steps, steps), 0.0,
                  {"sdxl": f"hf://ByteDance/SDXL-Lightning/sdxl_lightning_{steps}step_lora"
                           ".safetensors"})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("standard", "any scheduler (--scheduler), the grid's steps and guidance (CFG)",
           ("sd1", "sdxl", "sd3", "flux"), None, None),
    Preset("lcm", "LCM scheduler with LCM-LoRA, 4 steps, guidance 1", ("sd1", "sdxl"), "lcm",
           4, (2, 8), 1.0,
           {"sd1": "hf://latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors",
            "sdxl": "hf://latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors"}),
    _lightning(2), _lightning(4), _lightning(8),
    # SDXL-Turbo is made for 1 step; SD3.5-Large-Turbo for 4 (its model card:
    # num_inference_steps=4, guidance_scale=0.0), where 1 step gives poor images
    Preset("turbo", "SDXL-Turbo (1 step) / SD3.5-Large-Turbo (4 steps) models: 1 to 4 steps, "
           "guidance 0", ("sdxl", "sd3"), "euler_a_trailing", 1, (1, 4), 0.0,
           scheduler_by_family={"sd3": "flow_euler"}, steps_by_family={"sd3": 4}),
    _hyper(1), _hyper(2), _hyper(4), _hyper(8),
    Preset("schnell", "FLUX.1-schnell: 4 steps (1 to 4), guidance 0", ("flux",), "flow_euler",
           4, (1, 4), 0.0),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"--preset {name!r} is not a preset ({hint}presets: "
                        f"{', '.join(PRESETS)})")
    return PRESETS[name]


@dataclass(frozen=True)
class Sampling:
    """What one architecture is rendered with: the preset resolved for its family."""

    preset: str
    scheduler: str
    steps: int
    guidance: float
    lora_ref: str | None  # None: no LoRA
    lora_scale: float

    @property
    def sampler_label(self) -> str:
        return SCHEDULERS[self.scheduler][2]

    @property
    def schedule_type(self) -> str | None:
        """AUTOMATIC1111's `Schedule type` (1.9+) where it is not the sampler's own: our
        trailing timesteps are its "SGM Uniform" (from the largest timestep down in equal
        steps, leaving out the smallest, as diffusers' trailing spacing does)."""
        overrides = SCHEDULERS[self.scheduler][1]
        return "SGM Uniform" if overrides.get("timestep_spacing") == "trailing" else None


def resolve_sampling(preset: Preset, family: str, grid_steps: int, grid_guidance: float,
                     steps: int | None = None, guidance: float | None = None,
                     scheduler: str | None = None, lora: str | None = None,
                     lora_scale: float | None = None) -> Sampling:
    """The preset's settings for `family`, with the command line's overrides checked.
    `lora` is a reference, "none", or None for the preset's default."""
    if family not in preset.families:
        fits = ", ".join(FAMILY_LABELS[f] for f in preset.families)
        raise UserError(f"--preset {preset.name} is for {fits}, not "
                        f"{FAMILY_LABELS[family]}; use --preset standard for those candidates")
    chosen = steps or preset.steps_by_family.get(family, preset.steps) or grid_steps
    low, high = preset.step_range
    if not low <= chosen <= high:
        takes = f"exactly {_steps(low)}" if low == high else f"{low} to {high} steps"
        raise UserError(f"--steps {chosen}: --preset {preset.name} takes {takes}")
    name = (scheduler or preset.scheduler_by_family.get(family) or preset.scheduler
            or DEFAULT_SCHEDULER[family])
    check_scheduler(name, family)
    if guidance is None:
        guidance = preset.guidance_by_family.get(family, preset.guidance)
    if guidance is None:
        guidance = grid_guidance
    lora_ref = None if lora == "none" else lora or preset.loras.get(family)
    if lora_scale is None:
        lora_scale = preset.lora_scale_by_family.get(family, preset.lora_scale)
    return Sampling(preset.name, name, chosen, float(guidance), lora_ref, lora_scale)


def _steps(count: int) -> str:
    return f"{count} step{'' if count == 1 else 's'}"


def check_scheduler(name: str, family: str) -> None:
    if name not in SCHEDULERS:
        near = difflib.get_close_matches(name, list(SCHEDULERS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"--scheduler {name!r} is not known ({hint}schedulers: "
                        f"{', '.join(SCHEDULERS)})")
    flow = name.startswith("flow_")
    if flow != (family in FLOW_FAMILIES):
        kind = "a flow-matching" if family in FLOW_FAMILIES else "a noise-prediction"
        raise UserError(f"--scheduler {name}: {FAMILY_LABELS[family]} needs {kind} scheduler "
                        f"(e.g. {DEFAULT_SCHEDULER[family]})")


def make_scheduler(name: str, reference_config: dict):
    """A diffusers scheduler `name` built from the family's reference scheduler settings.

    Only the settings the scheduler takes are passed: the reference configs are those of
    other schedulers (SD1.5's is PNDM's, with `skip_prk_steps`), and diffusers warns about a
    key it does not expect, naming a scheduler_config.json the user never wrote."""
    import inspect

    import diffusers

    class_name, overrides, _ = SCHEDULERS[name]
    scheduler = getattr(diffusers, class_name)
    takes = inspect.signature(scheduler.__init__).parameters
    config = {key: value for key, value in {**reference_config, **overrides}.items()
              if key in takes or key.startswith("_")}  # _class_name ...: diffusers' own
    return scheduler.from_config(config)
