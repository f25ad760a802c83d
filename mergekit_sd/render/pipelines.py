"""One diffusers pipeline per architecture, built once from a checkpoint's shapes, whose weights
are then swapped in place for every candidate (DESIGN.md decision 9).

Building: configs derived from the file (`configs.py`), modules constructed with empty
parameters, storage allocated on the device in the render dtype, weights copied in through the
key map. Swapping: the same copy into the same parameters, nothing rebuilt. A preset's LoRA is
fused once with diffusers' own `load_lora_weights` + `fuse_lora`; after a swap it is fused again
into the weights just copied, so every candidate carries exactly the delta a fresh pipeline with
that LoRA fused would. That costs computing the delta again (B·A per layer: negligible on a
GPU, seconds for a full-size model on a CPU, measured in bench/render.py); keeping the deltas
instead would cost a second copy of every adapted weight in device memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.errors import UserError
from mergekit_sd.io.dtypes import RENDER_DTYPES, USER_DTYPES, parse_dtype, torch_dtype
from mergekit_sd.render.assets import TOKENIZER_FOLDERS, scheduler_config
from mergekit_sd.render.components import build_modules, load_tokenizers
from mergekit_sd.render.layout import (
    FAMILY_LABELS,
    CheckpointLayout,
    required_components,
)
from mergekit_sd.render.parts import with_parts
from mergekit_sd.render.weights import WeightTable, load_file, load_tensors, materialize


def render_dtype(family: str, device: str, requested: str = "auto"):
    """fp32 on the CPU (half precision is slow or unsupported there); on an accelerator fp16
    for SD1/SDXL and bf16 for SD3/FLUX, as their releases are meant to run."""
    import torch

    requested = parse_dtype(requested, RENDER_DTYPES, "render")
    if requested != "auto":
        return torch_dtype(USER_DTYPES[requested])
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if family in ("sd3", "flux") else torch.float16


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available on this machine; "
                        "use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this machine has no Apple GPU; use --device cpu")
    if not device.startswith(("cpu", "cuda", "mps")):
        raise UserError(f"--device {device!r}: use cpu, cuda, cuda:N or mps")
    return device


@dataclass
class LoraState:
    path: Path
    scale: float
    label: str
    components: list[str]  # those the LoRA adapts


@dataclass
class RenderPipeline:
    """A diffusers pipeline plus what swapping weights into it needs."""

    family: str
    variant: str | None  # the architecture id the pipeline was built for (flux-dev ...)
    pipe: object
    modules: dict[str, object]  # component name -> torch module
    device: str
    dtype: object
    context_width: int  # width of text features the diffusion model attends to
    base: CheckpointLayout
    lora: LoraState | None = None
    _tables: dict[tuple, WeightTable] = field(default_factory=dict)

    def table_for(self, layout: CheckpointLayout) -> WeightTable:
        """The key map of `layout` resolved against this pipeline's parameters (cached per
        distinct layout: a sweep's candidates all share their inputs' one; a file holding
        several text encoders given with --text-encoder is one layout per component)."""
        key = (tuple(layout.maps), tuple(layout.key_shapes.items()))
        table = self._tables.get(key)
        if table is None:
            check_compatible(self.base, layout)
            modules = {c: m for c, m in self.modules.items() if c in layout.maps}
            table = WeightTable(modules, layout.maps, layout.key_shapes)
            check_fit(self.base, layout, table)
            self._tables[key] = table
        return table

    def load(self, layout: CheckpointLayout, path: Path | None = None, tensors=None) -> int:
        """Copy a candidate's weights in (from `path`, or from (key, tensor) pairs); the
        preset's LoRA stays fused. Returns the number of checkpoint keys copied."""
        table = self.table_for(layout)
        check_complete(layout, table)
        # with a LoRA to fuse again, the weights get written: copy them rather than share pages
        copied = load_file(table, path, share=self.lora is None) if path is not None \
            else load_tensors(table, tensors)
        table.reset_unfilled(self.modules)
        if self.lora is not None:
            self._refuse(table)
        return copied

    def _refuse(self, table: WeightTable) -> None:
        """Fuse the LoRA again into the weights just copied. Their fused values were
        overwritten, so the LoRA layers holding them are told they are unmerged (not unfused:
        subtracting the delta from weights that are gone would be wasted work) and diffusers'
        `fuse_lora` adds the delta exactly as it does in a fresh pipeline."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        copied = {id(p) for p in table.params.values()}
        components = set()
        for component in self.lora.components:
            for module in self.modules[component].modules():
                if isinstance(module, BaseTunerLayer) and id(module.get_base_layer().weight) \
                        in copied:
                    module.merged_adapters = []
                    components.add(component)
        if components:
            self.pipe.fuse_lora(components=sorted(components), lora_scale=self.lora.scale)

    def fuse_lora(self, path: Path, scale: float, label: str) -> None:
        """Load a LoRA (kohya, diffusers/PEFT ... whatever diffusers reads) and fuse it."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            with quiet_transformers():
                self.pipe.load_lora_weights(str(path), adapter_name="preset")
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise UserError(f"{path}: diffusers could not load it as a LoRA for "
                            f"{FAMILY_LABELS[self.family]} ({str(exc).splitlines()[0][:200]})"
                            ) from None
        adapted = [c for c, m in self.modules.items()
                   if any(isinstance(sub, BaseTunerLayer) for sub in m.modules())]
        self.pipe.fuse_lora(components=adapted, lora_scale=scale)
        self.lora = LoraState(Path(path), scale, label, adapted)


def check_fit(base: CheckpointLayout, layout: CheckpointLayout, table: WeightTable) -> None:
    """Refuse a file whose weights have other sizes than the pipeline built from `base`."""
    if not table.mismatched:
        return
    name, want, got = table.mismatched[0]
    if layout is base:
        raise UserError(f"{layout.name}: {name} has {got} values but the model its shapes "
                        f"describe has {want}; it is no released "
                        f"{FAMILY_LABELS[layout.family]} layout")
    raise UserError(f"{layout.name}: {name} has {got} values where the pipeline built from "
                    f"{base.name} has {want}; render models of different sizes separately")


def check_complete(layout: CheckpointLayout, table: WeightTable) -> None:
    """Refuse a file lacking weights that have no neutral value: swapped in, those parameters
    would keep the previous candidate's values and its images would blend two models."""
    missing = table.required_missing()
    if missing:
        component, names = next(iter(missing.items()))
        raise UserError(f"{layout.name}: its {component} lacks {len(names)} weight(s) the "
                        f"pipeline needs (e.g. {names[0]}); the file is incomplete")


# LoRA kinds diffusers' load_lora_weights cannot fuse (it reads LoRA and LoCon down/up pairs)
_UNFUSABLE = ("LyCORIS LoKr", "LyCORIS LoHa", "full diff (LyCORIS)")


def check_lora(path: Path, family: str) -> None:
    """Refuse, before any pipeline is built, a --lora that is no safetensors LoRA, one for
    another architecture, or a kind diffusers cannot fuse: one sentence from our own reading of
    the file instead of diffusers' and PEFT's pages of module names."""
    from mergekit_sd.arch.identify import identify
    from mergekit_sd.errors import BadModelFile
    from mergekit_sd.io.header import read_header
    from mergekit_sd.render.layout import FAMILIES

    try:
        found = identify(read_header(path))
    except BadModelFile as exc:
        raise UserError(f"--lora {exc}") from None
    if found.lora is None:
        raise UserError(f"--lora {path}: is {found.label}, not a LoRA")
    kind = found.lora.format
    if kind in _UNFUSABLE:
        raise UserError(f"--lora {path}: is a {kind}, which diffusers cannot fuse; give a "
                        "LoRA or LoCon, or --lora none")
    lora_family = FAMILIES.get(found.lora.base or "")
    if lora_family is not None and lora_family != family:
        raise UserError(f"--lora {path}: is a {kind} for {FAMILY_LABELS[lora_family]}; the "
                        f"candidates are {FAMILY_LABELS[family]}")


def check_compatible(base: CheckpointLayout, other: CheckpointLayout) -> None:
    if other.family != base.family:
        raise UserError(f"{other.name} is {FAMILY_LABELS[other.family]} but the pipeline is "
                        f"{FAMILY_LABELS[base.family]}; each architecture gets its own pipeline")


@dataclass
class PipelineParts:
    """What a pipeline is built from, found before anything is drawn or written: the layout
    completed with the component files (`whole`), the tokenizers, and the family's models
    with empty (meta) parameters."""

    layout: CheckpointLayout
    files: dict  # component -> `render.parts.Part` supplying it
    whole: CheckpointLayout
    tokenizers: dict
    modules: dict[str, object]
    context_width: int


def prepare_pipeline(layout: CheckpointLayout, config_dir: Path | None = None,
                     files: dict | None = None) -> PipelineParts:
    """Every check of building a pipeline from `layout` (the components it lacks taken from
    `files`, component -> `render.parts.Part`) that needs none of its weights: complete,
    tokenizers found and usable, configs derived from its shapes, and its keys filling every
    parameter. No weight is allocated; `build_pipeline` does that later, so a run can check
    all its architectures before it renders or writes anything."""
    files = {c: p for c, p in (files or {}).items() if c not in layout.maps}
    whole = with_parts(layout, files)
    missing = [c for c in required_components(layout.family) if c not in whole.maps]
    if missing:
        options = " and ".join(dict.fromkeys(
            "--vae FILE" if c == "vae" else "--text-encoder FILE" for c in missing))
        raise UserError(f"{layout.name} has no {', '.join(missing)}; give them as separate "
                        f"files with {options}, or put a full checkpoint of the same "
                        "architecture before it (a pipeline is built from the first "
                        "candidate of each architecture)")
    tokenizers = load_tokenizers(whole, config_dir)
    modules, context_width = build_modules(whole, tokenizers)
    table = WeightTable(modules, whole.maps, whole.key_shapes)  # on meta: shapes only
    check_fit(whole, whole, table)
    check_complete(whole, table)
    return PipelineParts(layout, files, whole, tokenizers, modules, context_width)


def build_pipeline(layout: CheckpointLayout, path: Path | None = None, tensors=None,
                   device: str = "cpu", dtype: str = "auto",
                   config_dir: Path | None = None, files: dict | None = None,
                   prepared: PipelineParts | None = None) -> RenderPipeline:
    """A pipeline for `layout`'s architecture holding its weights (from `path` or tensors),
    the components it lacks taken from `files` (component -> `render.parts.Part`);
    `prepared` from `prepare_pipeline` when the run already checked them."""
    check_device(device)
    torch_dtype = render_dtype(layout.family, device, dtype)
    if prepared is None or prepared.layout is not layout:
        prepared = prepare_pipeline(layout, config_dir, files)
    modules, tokenizers = prepared.modules, prepared.tokenizers
    for module in modules.values():
        materialize(module, device, torch_dtype)
    pipe = _assemble(layout, modules, tokenizers)
    rp = RenderPipeline(layout.family, layout.found.architecture, pipe, modules, device,
                        torch_dtype, prepared.context_width, layout)
    rp.load(layout, path=path, tensors=tensors)
    for part in prepared.files.values():
        rp.load(part.layout(layout.family), path=part.path)
    pipe.set_progress_bar_config(disable=True)
    # one image at a time through the VAE: a batch's decode needs no more memory than one
    modules["vae"].enable_slicing()
    return rp


@contextlib.contextmanager
def quiet_transformers():
    """transformers warns, when diffusers' pipelines import it, about optional backends
    (torchvision) rendering never uses, and draws a progress bar for every LoRA it loads;
    diffusers and PEFT log every module name a LoRA does not fit, and the tokenizer warns of
    "indexing errors" for a prompt it then truncates safely. Keep all of it off the user's
    terminal: what matters is said in our own sentences."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging

    before, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    diffusers_before = diffusers_logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(before)
        diffusers_logging.set_verbosity(diffusers_before)
        if bars:
            logging.enable_progress_bar()


# --- assembling diffusers' pipeline classes -------------------------------------------------------

_PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                     "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# what each class takes besides models, tokenizers and scheduler
_EXTRA = {"sd1": {"safety_checker": None, "feature_extractor": None,
                  "requires_safety_checker": False},
          "sdxl": {"add_watermarker": False}}


def _scheduler(layout: CheckpointLayout):
    import diffusers

    config = scheduler_config(layout.family, layout.found.architecture)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _assemble(layout: CheckpointLayout, modules: dict, tokenizers: dict):
    with quiet_transformers():
        import diffusers

        cls = getattr(diffusers, _PIPELINE_CLASSES[layout.family])
    named_tokenizers = {TOKENIZER_FOLDERS[c]: t for c, t in tokenizers.items()}
    return cls(**modules, **named_tokenizers, scheduler=_scheduler(layout),
               **_EXTRA.get(layout.family, {}))
