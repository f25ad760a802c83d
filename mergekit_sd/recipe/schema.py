"""The recipe file as pydantic models that mirror the YAML one to one.

```yaml
version: 1
models:                      # name -> reference (path, catalog:NAME, sha256:HASH, hf://, civitai://)
  base: models/base.safetensors
  anime: catalog:anime-v3
steps:                       # run in order; inputs are models or earlier steps
  - name: mix
    method: weighted_sum
    inputs: [base, anime]
    params:
      alpha: 0.3             # a scalar, a sweep list, or {default, blocks, components, keys}
output:
  path: out/mix.safetensors
  dtype: fp16
```
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    model_validator,
)

from mergekit_sd.arch.block_lists import plain_number
from mergekit_sd.io.dtypes import CHECKPOINT_DTYPES, dtype_name, dtype_problem

Scalar = float | int | bool | str

DTYPES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "keep")
STEP_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_a_url(ref: str) -> str:
    # A download link is no model reference: it would be read as a file path, and a token in
    # its query would be printed back in the "does not exist" sentence.
    if re.match(r"(?i)https?://", ref):
        raise ValueError("a download link is not a model reference; fetch it with "
                         "`mergekit-sd pull URL` and refer to it as catalog:NAME (or use "
                         "hf://ORG/REPO/FILE or civitai://VERSION)")
    return ref


Reference = Annotated[str, AfterValidator(_not_a_url)]


def _whole_sha256(value: str) -> str:
    # a prefix would pass the plan and be refused only after the whole merge
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"give all 64 hex digits of the file's SHA256, not {value!r}")
    return value


def _digits_read_as_number(value: Any) -> Any:
    # 64 hex digits that happen to be all decimal: YAML reads them as an integer (and drops
    # any leading zeros), which "Input should be a valid string" does not explain
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("YAML reads a SHA256 of digits only as a number, not text; put it in "
                         "quotes: sha256: \"0123…\"")
    return value


Sha256 = Annotated[str, BeforeValidator(_digits_read_as_number), AfterValidator(_whole_sha256)]


class ModelRef(Strict):
    """A model input in its long form; the short form is the reference string alone."""

    ref: Reference
    sha256: Sha256 | None = Field(None, description="expected SHA256; checked before merging")


# The forms `blocks` takes, said whenever a value is none of them.
BLOCK_FORMS = ("give blocks as {BLOCK or RANGE: value} (e.g. {IN00-IN05: 0.2, M00: 1}), as one "
               "value per block in order, a list or a comma-separated string as supermerger "
               "writes them (26 or 17 values for SD1, 20 or 12 for SDXL; see `mergekit-sd "
               "blocks ARCH`), or as a preset (all, none, in, mid, out, in-mid, mid-out, double, "
               "single)")


def _blocks_form(value: Any) -> str | None:
    if isinstance(value, dict):
        return "block-map"
    if isinstance(value, list):
        return "block-list"
    return "block-text" if isinstance(value, str) else None


def _block_number(value: Any) -> float:
    # pydantic's own words ("Input should be a valid number") say nothing of what to give;
    # a bool is no block value, though pydantic would turn it into one. YAML reads 1e-3 (no
    # dot) as text: taken as the number it is, as in a comma-separated block string.
    if isinstance(value, str) and plain_number(value) is not None:
        return plain_number(value)
    if isinstance(value, list):
        raise ValueError("a sweep (a list of values) is only possible on a parameter or its "
                         "default, not on a block's value; give each block one number")
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value)):
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as YAML
        raise ValueError(f"{shown} is not a finite number; give each block a number, such "
                         "as 0.5")
    return float(value)


# A number in a block list (and a LoRA's block map): finite, not a bool, no other text.
BlockListValue = Annotated[float, PlainValidator(_block_number)]


def _block_forms(map_value, forms: str):
    """`blocks` in its three forms: {BLOCK or RANGE: value}; one number per block (a list, or
    supermerger's comma string, checked against the architecture by `recipe.params`); a
    preset name. A value of none of them is answered with `forms`."""
    return Annotated[
        Annotated[dict[str, map_value], Tag("block-map")]
        | Annotated[list[BlockListValue], Tag("block-list")]
        | Annotated[str, Tag("block-text")],
        Discriminator(_blocks_form, custom_error_type="block_values",
                      custom_error_message=forms),
    ]


BlockValues = _block_forms(Scalar, BLOCK_FORMS)


class ParamSpec(Strict):
    """A parameter that varies across the model. Precedence, most specific first:
    keys (first matching pattern in file order) > components > blocks > default."""

    default: Scalar | list[Scalar] | None = None
    blocks: BlockValues = Field(default_factory=dict)
    components: dict[str, Scalar] = Field(default_factory=dict)
    keys: dict[str, Scalar] = Field(default_factory=dict)


def _param_shape(value: Any) -> str:
    if isinstance(value, dict | ParamSpec):
        return "spec"
    return "sweep" if isinstance(value, list) else "scalar"


# Tagged by shape so an error inside a spec is reported at its own field, not once per member.
ParamValue = Annotated[
    Annotated[Scalar, Tag("scalar")] | Annotated[list[Scalar], Tag("sweep")]
    | Annotated[ParamSpec, Tag("spec")],
    Discriminator(_param_shape),
]


# A NaN or infinite strength would write a model full of NaN.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


# The forms a LoRA's `blocks` takes (`lora.strengths`), said whenever a value is none of them.
LORA_BLOCK_FORMS = ("give blocks as {BLOCK, RANGE or PATTERN: strength} (e.g. {IN*: 0.5, "
                    "OUT05: 1.2, default: 1}), as one strength per block in order, a list or "
                    "a comma-separated string as LoRA Block Weight writes them (26 or 17 "
                    "values for SD1, 20 or 12 for SDXL; see `mergekit-sd blocks ARCH`), or as "
                    "a preset (all, none, in, mid, out, in-mid, mid-out, double, single)")
# The forms of merge parameters' `blocks`, with strengths (numbers) for values; a map's keys
# may also be shell patterns and `default` (checked against the architecture by the plan).
LoraBlocks = _block_forms(BlockListValue, LORA_BLOCK_FORMS)


class LoraSpec(Strict):
    """One LoRA of a `bake_lora` step: a name from `models`, and how strongly to apply it."""

    model: str
    strength: FiniteFloat = 1.0
    te_strength: FiniteFloat | None = Field(None, description="text encoders; default: strength")
    blocks: LoraBlocks | None = Field(
        None, description="per-block strengths: a preset, a list, or {block pattern: value}")


class Step(Strict):
    name: str = Field(pattern=STEP_NAME)
    method: str
    inputs: list[str] = Field(min_length=1)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    loras: list[LoraSpec] = Field(default_factory=list, description="bake_lora: LoRAs to bake")
    allow_unmatched: bool = Field(False, description="bake_lora: bake even when some LoRA "
                                                     "modules name no weight of the input")


def _short_dtype_name(value: Any) -> Any:
    # the names `convert --dtype` takes (float16 ...), recorded as the short one; any other
    # name gets the sentence every --dtype gives, not pydantic's list of the literals
    if not isinstance(value, str):
        return value
    problem = dtype_problem(value, CHECKPOINT_DTYPES, "merge")
    if problem is not None:
        raise ValueError(problem)
    return dtype_name(value)


OutputDtype = Annotated[Literal["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "keep"],
                        BeforeValidator(_short_dtype_name)]


class Output(Strict):
    path: str
    step: str | None = Field(None, description="the step to write; the last one by default")
    dtype: OutputDtype = "fp16"
    vae: Reference | None = Field(None, description="a VAE file whose weights replace the "
                                                   "merged VAE")
    vae_sha256: Sha256 | None = Field(None, description="expected SHA256 of the vae file; "
                                                        "checked before merging")
    drop_ema: bool = True
    inference_only: bool = False
    title: str | None = None
    date: str | None = Field(None, description="modelspec.date; today (UTC) when absent")


class Recipe(Strict):
    version: Literal[1] = 1
    models: dict[str, Reference | ModelRef] = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)
    output: Output

    @model_validator(mode="after")
    def _names_resolve_in_order(self) -> Recipe:
        known = set(self.models)
        for index, step in enumerate(self.steps):
            if step.name in known:
                raise ValueError(f"steps.{index}.name: {step.name!r} is already the name of a "
                                 "model or an earlier step")
            for i, name in enumerate(step.inputs):
                if name == step.name:
                    raise ValueError(f"steps.{index}.inputs.{i}: step {step.name!r} takes "
                                     "itself as input (a cycle)")
                if name not in known:
                    later = [s.name for s in self.steps[index + 1:]]
                    why = ("is a later step: steps run in order, so that would be a cycle"
                           if name in later else "is neither a model nor an earlier step")
                    raise ValueError(f"steps.{index}.inputs.{i}: {name!r} {why}")
            if (step.method == "bake_lora") != bool(step.loras):
                raise ValueError(f"steps.{index}.loras: " + (
                    "a bake_lora step lists the LoRAs to bake under loras" if step.loras == []
                    else f"only bake_lora steps take loras, not {step.method}"))
            for i, lora in enumerate(step.loras):
                if lora.model not in self.models:
                    raise ValueError(f"steps.{index}.loras.{i}.model: {lora.model!r} is not a "
                                     "name under models")
            known.add(step.name)
        if self.output.step is not None and self.output.step not in {s.name for s in self.steps}:
            raise ValueError(f"output.step: {self.output.step!r} is not a step of this recipe")
        if self.output.vae_sha256 is not None and self.output.vae is None:
            raise ValueError("output.vae_sha256: pins the file of output.vae, which is not given")
        return self

    @property
    def final_step(self) -> Step:
        wanted = self.output.step or self.steps[-1].name
        return next(s for s in self.steps if s.name == wanted)

    @property
    def needed_steps(self) -> list[Step]:
        """The steps the output step depends on, in recipe order: only these run."""
        by_name = {s.name: s for s in self.steps}
        needed, stack = set(), [self.final_step.name]
        while stack:
            name = stack.pop()
            if name in by_name and name not in needed:
                needed.add(name)
                stack.extend(by_name[name].inputs)
        return [s for s in self.steps if s.name in needed]

    def unused(self) -> tuple[list[Step], list[str]]:
        """The steps the output step does not depend on and the models no step it depends on
        takes (as an input or a LoRA): nothing runs or reads them."""
        needed = self.needed_steps
        used = {name for step in needed for name in step.inputs} | \
            {lora.model for step in needed for lora in step.loras}
        return ([s for s in self.steps if s not in needed],
                [name for name in self.models if name not in used])

    def model_ref(self, name: str) -> ModelRef:
        value = self.models[name]
        return value if isinstance(value, ModelRef) else ModelRef(ref=value)
