"""Synthetic LoRA files in every common format, shaped to fit the synthetic checkpoints.

Each format names its modules exactly as the real trainers do (kohya's sd-scripts, LyCORIS,
diffusers/PEFT, ai-toolkit, XLabs), and each module's tensors have the shapes that fit the
matching checkpoint variant at the same size: a tiny LoRA bakes into a tiny checkpoint, a full
one into a full one. `lora_targets` says, for every module, which checkpoint weight its delta
lands on (and which rows of it, for modules that adapt one part of a fused qkv weight), so bake
and merge tests need no format knowledge of their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.io.writer import TensorSpec
from mergekit_sd.testing.checkpoints import (
    SIZES,
    check_choice,
    checkpoint_specs,
    synthetic_tensor,
    tiny_dim,
    write_specs,
)

LORA_FORMATS = (
    "kohya-sd1", "kohya-sd2", "kohya-sdxl", "locon-sd1", "tucker-sd1", "loha-sd1", "lokr-sd1",
    "full-diff-sd1", "dora-sdxl", "peft-sd1", "peft-sdxl", "diffusers-old-sd1",
    "kohya-flux", "aitoolkit-flux", "xlabs-flux", "diffusers-flux", "kohya-sd3", "lycoris-sdxl",
)

_UNET = "model.diffusion_model."


@dataclass(frozen=True, slots=True)
class LoraTarget:
    """One module of a LoRA file and the checkpoint weight its delta is added to."""

    module: str  # the module's name in the file; its tensors are module + a format suffix
    key: str  # the weight in the base checkpoint (checkpoint_specs of LORA_BASES[fmt])
    shape: tuple[int, ...]  # the delta's shape: key's shape, or that of its rows below
    rows: tuple[int, int] | None = None  # rows of `key` when the module is one part of it
    bias: str | None = None  # the checkpoint bias of the module, where it has one


@dataclass(frozen=True, slots=True)
class _Module:
    """A module at full size; `parts` are the full row counts of a fused weight it splits."""

    name: str
    key: str
    parts: tuple[int, ...] | None = None
    part: int = 0


def _under(path: str) -> str:
    """kohya's module names: the dotted path with dots turned into underscores."""
    return path.replace(".", "_")


# --- SD1 / SD2 / SDXL UNet: diffusers module paths and their ldm/sgm counterparts ----------------

# (diffusers level, ldm block base, transformer depth) of the levels with cross-attention;
# down levels have 2 resnets (+ attentions) per level, up levels 3, hence the 3*i+j indices.
_ATTENTION_LEVELS = {
    "sd": ([(0, 1), (1, 1), (2, 1)], 1, [(1, 1), (2, 1), (3, 1)]),
    "sdxl": ([(1, 2), (2, 10)], 10, [(0, 10), (1, 2)]),
}
_ATTN_LEAVES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_FF_LEAVES = ("ff.net.0.proj", "ff.net.2")


def _transformers(arch: str) -> Iterator[tuple[str, str, int]]:
    """(diffusers path, ldm path, depth) of every transformer of the UNet."""
    down, mid_depth, up = _ATTENTION_LEVELS[arch]
    for i, depth in down:
        for j in range(2):
            yield f"down_blocks.{i}.attentions.{j}", f"input_blocks.{1 + 3 * i + j}.1", depth
    yield "mid_block.attentions.0", "middle_block.1", mid_depth
    for i, depth in up:
        for j in range(3):
            yield f"up_blocks.{i}.attentions.{j}", f"output_blocks.{3 * i + j}.1", depth


def _unet_linear(arch: str, kohya_set: bool) -> Iterator[tuple[str, str]]:
    """(diffusers path, ldm path) of the attention projections; kohya's default set adds
    proj_in/proj_out and the feed-forward layers (every Linear and 1x1 conv of a transformer)."""
    for diffusers, ldm, depth in _transformers(arch):
        if kohya_set:
            for leaf in ("proj_in", "proj_out"):
                yield f"{diffusers}.{leaf}", f"{ldm}.{leaf}"
        leaves = _ATTN_LEAVES + (_FF_LEAVES if kohya_set else ())
        for k in range(depth):
            for leaf in leaves:
                yield (f"{diffusers}.transformer_blocks.{k}.{leaf}",
                       f"{ldm}.transformer_blocks.{k}.{leaf}")


def _sd1_resnet_convs() -> Iterator[tuple[str, str]]:
    """(diffusers path, ldm path) of the 3x3 convolutions of every SD1 resnet (LoCon targets)."""
    resnets = [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + 3 * i + j}.0")
               for i in range(4) for j in range(2)]
    resnets += [("mid_block.resnets.0", "middle_block.0"),
                ("mid_block.resnets.1", "middle_block.2")]
    resnets += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{3 * i + j}.0")
                for i in range(4) for j in range(3)]
    for diffusers, ldm in resnets:
        yield f"{diffusers}.conv1", f"{ldm}.in_layers.2"
        yield f"{diffusers}.conv2", f"{ldm}.out_layers.3"


# --- text encoders, named as transformers' CLIPTextModel (what every trainer uses) ---------------

_TE_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_TE_ALL = _TE_ATTENTION + ("mlp.fc1", "mlp.fc2")


def _hf_clip(prefix: str, layers: int, leaves: tuple[str, ...]) -> Iterator[_Module]:
    """Modules of a CLIP stored in transformers naming under `prefix` (SD1, SDXL's CLIP-L)."""
    for n in range(layers):
        for leaf in leaves:
            path = f"text_model.encoder.layers.{n}.{leaf}"
            yield _Module(path, f"{prefix}{path}.weight")


def _open_clip(prefix: str, layers: int, width: int, leaves: tuple[str, ...]) -> Iterator[_Module]:
    """Modules named as transformers' CLIP on an OpenCLIP checkpoint (SD2, SDXL's CLIP-G):
    q/k/v are the three row blocks of the fused in_proj_weight."""
    for n in range(layers):
        block = f"{prefix}transformer.resblocks.{n}."
        for leaf in leaves:
            path = f"text_model.encoder.layers.{n}.{leaf}"
            qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            if leaf in qkv:
                yield _Module(path, block + "attn.in_proj_weight", (width,) * 3, qkv.index(leaf))
            else:
                other = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                         "mlp.fc2": "mlp.c_proj"}[leaf]
                yield _Module(path, f"{block}{other}.weight")


# (kohya prefix, diffusers prefix, modules) of each model's text encoders. SDXL's CLIP-L stops
# at layer 10 and CLIP-G at 30: the last layers are optional in the SDXL layout (SDXL reads the
# penultimate layer), so a LoRA on them would have no weight to land on in the sdxl variant.
def _text_encoders(base: str, leaves: tuple[str, ...]) -> list[tuple[str, str, list[_Module]]]:
    if base == "sd1":
        return [("lora_te", "text_encoder",
                 list(_hf_clip("cond_stage_model.transformer.", 12, leaves)))]
    if base == "sd2":  # kohya's SD2 text model has 23 layers: the 24th is never used
        return [("lora_te", "text_encoder",
                 list(_open_clip("cond_stage_model.model.", 23, 1024, leaves)))]
    return [
        ("lora_te1", "text_encoder",
         list(_hf_clip("conditioner.embedders.0.transformer.", 11, leaves))),
        ("lora_te2", "text_encoder_2",
         list(_open_clip("conditioner.embedders.1.model.", 31, 1280, leaves))),
    ]


def _sd_modules(base: str, style: str, resnet_convs: bool = False) -> list[_Module]:
    """SD1/SD2/SDXL modules in `style` naming: "kohya" (lora_unet_/lora_te_, every Linear of
    the transformers and the text encoders), "diffusers" (unet./text_encoder., attention
    projections only, the diffusers training scripts' default) or "lycoris" (LyCORIS outside
    sd-scripts, as SimpleTuner trains: lycoris_ + the diffusers UNet's module path with dots
    turned into underscores, on its Attention and FeedForward modules; no text encoder)."""
    kohya = style == "kohya"
    arch = "sdxl" if base == "sdxl" else "sd"
    convs = _sd1_resnet_convs() if resnet_convs else iter(())
    if style == "lycoris":
        return [_Module("lycoris_" + _under(diffusers), f"{_UNET}{ldm}.weight")
                for diffusers, ldm in _unet_linear(arch, True)
                if not diffusers.endswith(("proj_in", "proj_out"))]
    modules = []
    for diffusers, ldm in (*_unet_linear(arch, kohya), *convs):
        if kohya:
            # kohya names SD1/SD2 modules by their diffusers path, SDXL ones by the sgm path
            name = "lora_unet_" + _under(ldm if arch == "sdxl" else diffusers)
        else:
            name = f"unet.{diffusers}"
        modules.append(_Module(name, f"{_UNET}{ldm}.weight"))
    for kohya_prefix, diffusers_prefix, te_modules in _text_encoders(
            base, _TE_ALL if kohya else _TE_ATTENTION):
        for m in te_modules:
            name = f"{kohya_prefix}_{_under(m.name)}" if kohya else f"{diffusers_prefix}.{m.name}"
            modules.append(_Module(name, m.key, m.parts, m.part))
    return modules


# --- FLUX.1 and SD3 ------------------------------------------------------------------------------

_FLUX_DOUBLE, _FLUX_SINGLE = 19, 38
_FLUX_HIDDEN, _FLUX_MLP = 3072, 12288
_FLUX_DOUBLE_LEAVES = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                       "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
_FLUX_SINGLE_LEAVES = ("linear1", "linear2", "modulation.lin")


def _flux_paths() -> Iterator[str]:
    for n in range(_FLUX_DOUBLE):
        for leaf in _FLUX_DOUBLE_LEAVES:
            yield f"double_blocks.{n}.{leaf}"
    for n in range(_FLUX_SINGLE):
        for leaf in _FLUX_SINGLE_LEAVES:
            yield f"single_blocks.{n}.{leaf}"


def _kohya_flux() -> list[_Module]:
    """sd-scripts' lora_flux: every Linear of the blocks, and CLIP-L when trained (lora_te1)."""
    modules = [_Module("lora_unet_" + _under(p), f"{_UNET}{p}.weight") for p in _flux_paths()]
    for m in _hf_clip("text_encoders.clip_l.transformer.", 12, _TE_ALL):
        modules.append(_Module("lora_te1_" + _under(m.name), m.key))
    return modules


def _aitoolkit_flux() -> list[_Module]:
    """ai-toolkit's ComfyUI-style export: BFL module paths under diffusion_model., PEFT A/B."""
    return [_Module(f"diffusion_model.{p}", f"{_UNET}{p}.weight") for p in _flux_paths()]


def _xlabs_flux() -> list[_Module]:
    """XLabs' attention processors of the double blocks: 1 is the image stream, 2 the text."""
    processors = (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                  ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj"))
    return [_Module(f"double_blocks.{n}.processor.{proc}",
                    f"{_UNET}double_blocks.{n}.{leaf}.weight")
            for n in range(_FLUX_DOUBLE) for proc, leaf in processors]


def _diffusers_flux() -> list[_Module]:
    """diffusers' FluxTransformer2DModel names: q, k, v are separate there, fused in BFL's qkv
    (and, in single blocks, fused with the MLP input in linear1)."""
    qkv = (_FLUX_HIDDEN,) * 3
    linear1 = qkv + (_FLUX_MLP,)
    double = (("attn.to_q", "img_attn.qkv", qkv, 0), ("attn.to_k", "img_attn.qkv", qkv, 1),
              ("attn.to_v", "img_attn.qkv", qkv, 2), ("attn.to_out.0", "img_attn.proj", None, 0),
              ("attn.add_q_proj", "txt_attn.qkv", qkv, 0),
              ("attn.add_k_proj", "txt_attn.qkv", qkv, 1),
              ("attn.add_v_proj", "txt_attn.qkv", qkv, 2),
              ("attn.to_add_out", "txt_attn.proj", None, 0),
              ("ff.net.0.proj", "img_mlp.0", None, 0), ("ff.net.2", "img_mlp.2", None, 0),
              ("ff_context.net.0.proj", "txt_mlp.0", None, 0),
              ("ff_context.net.2", "txt_mlp.2", None, 0))
    single = (("attn.to_q", "linear1", linear1, 0), ("attn.to_k", "linear1", linear1, 1),
              ("attn.to_v", "linear1", linear1, 2), ("proj_mlp", "linear1", linear1, 3),
              ("proj_out", "linear2", None, 0))
    modules = []
    for n in range(_FLUX_DOUBLE):
        for leaf, bfl, parts, part in double:
            modules.append(_Module(f"transformer.transformer_blocks.{n}.{leaf}",
                                   f"{_UNET}double_blocks.{n}.{bfl}.weight", parts, part))
    for n in range(_FLUX_SINGLE):
        for leaf, bfl, parts, part in single:
            modules.append(_Module(f"transformer.single_transformer_blocks.{n}.{leaf}",
                                   f"{_UNET}single_blocks.{n}.{bfl}.weight", parts, part))
    return modules


def _kohya_sd3() -> list[_Module]:
    """sd-scripts' lora_sd3: every Linear of the joint blocks (attn qkv/proj, mlp, adaLN);
    read from the layout, so the last block's pre-only context stream comes out right."""
    leaves = (".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc1.weight", ".mlp.fc2.weight",
              ".adaLN_modulation.1.weight")
    modules = []
    for spec in checkpoint_specs("sd3-medium", "full"):
        if spec.name.startswith(_UNET + "joint_blocks.") and spec.name.endswith(leaves):
            path = spec.name[len(_UNET):-len(".weight")]
            modules.append(_Module("lora_unet_" + _under(path), spec.name))
    return modules


# --- the formats ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Format:
    base: str  # checkpoint variant the LoRA is made for
    algo: str  # how each module is stored (see _module_specs)
    modules: Callable[[], list[_Module]]
    trainer: str | None = None  # kohya network module, for ss_* metadata; None: no ss_* keys
    network_args: Mapping[str, str] | None = None


_LYCORIS = "lycoris.kohya"
_FORMATS: dict[str, _Format] = {
    "kohya-sd1": _Format("sd1", "lora", lambda: _sd_modules("sd1", "kohya"), "networks.lora"),
    "kohya-sd2": _Format("sd2", "lora", lambda: _sd_modules("sd2", "kohya"), "networks.lora"),
    "kohya-sdxl": _Format("sdxl", "lora", lambda: _sd_modules("sdxl", "kohya"), "networks.lora"),
    "locon-sd1": _Format("sd1", "lora", lambda: _sd_modules("sd1", "kohya", True), _LYCORIS,
                         {"algo": "locon"}),
    "tucker-sd1": _Format("sd1", "tucker", lambda: _sd_modules("sd1", "kohya", True), _LYCORIS,
                          {"algo": "locon", "use_tucker": "True"}),
    "loha-sd1": _Format("sd1", "loha", lambda: _sd_modules("sd1", "kohya", True), _LYCORIS,
                        {"algo": "loha", "use_tucker": "True"}),
    "lokr-sd1": _Format("sd1", "lokr", lambda: _sd_modules("sd1", "kohya", True), _LYCORIS,
                        {"algo": "lokr", "factor": "-1", "use_tucker": "True"}),
    "full-diff-sd1": _Format("sd1", "full", lambda: _sd_modules("sd1", "kohya", True), _LYCORIS,
                             {"algo": "full"}),
    "dora-sdxl": _Format("sdxl", "dora", lambda: _sd_modules("sdxl", "kohya"), _LYCORIS,
                         {"algo": "lora", "dora_wd": "True"}),
    "peft-sd1": _Format("sd1", "peft", lambda: _sd_modules("sd1", "diffusers")),
    "peft-sdxl": _Format("sdxl", "peft", lambda: _sd_modules("sdxl", "diffusers")),
    "diffusers-old-sd1": _Format("sd1", "diffusers-old", lambda: _sd_modules("sd1", "diffusers")),
    "kohya-flux": _Format("flux-dev", "lora", _kohya_flux, "networks.lora_flux"),
    "aitoolkit-flux": _Format("flux-dev", "peft", _aitoolkit_flux),
    "xlabs-flux": _Format("flux-dev", "xlabs", _xlabs_flux),
    "diffusers-flux": _Format("flux-dev", "peft", _diffusers_flux),
    "kohya-sd3": _Format("sd3-medium", "lora", _kohya_sd3, "networks.lora_sd3"),
    # SimpleTuner's LyCORIS default: LoKr
    "lycoris-sdxl": _Format("sdxl", "lokr", lambda: _sd_modules("sdxl", "lycoris")),
}

LORA_BASES: dict[str, str] = {fmt: f.base for fmt, f in _FORMATS.items()}

# ss_base_model_version as sd-scripts writes it; modelspec.architecture as its sai_model_spec does
_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
                  "flux-dev": "flux1", "sd3-medium": "sd3"}
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                  "sdxl": "stable-diffusion-xl-v1-base", "flux-dev": "flux-1-dev",
                  "sd3-medium": "stable-diffusion-3-medium"}


def lora_targets(fmt: str, size: str = "tiny") -> list[LoraTarget]:
    """Every module of format `fmt` with the checkpoint weight (and rows) its delta lands on."""
    check_choice("LoRA format", fmt, LORA_FORMATS)
    check_choice("size", size, SIZES)
    form = _FORMATS[fmt]
    full = {s.name: s.shape for s in checkpoint_specs(form.base, "full")}
    sized = {s.name: s.shape for s in checkpoint_specs(form.base, size)}
    targets = []
    for m in form.modules():
        shape = sized[m.key]
        rows = None
        if m.parts is not None:
            if sum(m.parts) != full[m.key][0]:
                raise AssertionError(f"{m.name}: parts {m.parts} do not tile {m.key} {full[m.key]}")
            sizes = [tiny_dim(p) if size == "tiny" else p for p in m.parts]
            if sum(sizes) != shape[0]:  # the tiny rule must keep fused weights splittable
                raise AssertionError(f"{m.name}: {size} parts {sizes} do not tile {shape}")
            rows = (sum(sizes[:m.part]), sum(sizes[:m.part + 1]))
            shape = (sizes[m.part], *shape[1:])
        bias = m.key.removesuffix("weight") + "bias"
        targets.append(LoraTarget(m.name, m.key, shape, rows,
                                  bias if rows is None and bias in sized else None))
    return targets


# --- tensors of one module, per storage scheme ---------------------------------------------------


def _factor(d: int) -> tuple[int, int]:
    """d = a * b with a <= b as close as possible (LyCORIS' factorization with factor -1)."""
    a = max(i for i in range(1, int(d ** 0.5) + 1) if d % i == 0)
    return a, d // a


def _module_specs(algo: str, target: LoraTarget, rank: int
                  ) -> list[tuple[str, tuple[int, ...], str]]:
    """(suffix, shape, role) of each tensor; role is "value", "alpha" or "scale"."""
    out, inp, kernel = target.shape[0], target.shape[1], target.shape[2:]
    r = rank
    spatial = bool(kernel) and kernel != (1, 1)  # a 3x3 conv; 1x1 convs behave like linears
    unit = (1,) * len(kernel)  # trailing 1x1 of a conv's up/down projections
    alpha = [(".alpha", (), "alpha")]
    down_up = [(".lora_down.weight", (r, inp, *kernel), "value"),
               (".lora_up.weight", (out, r, *unit), "value")]
    if algo == "lora":
        return down_up + alpha
    if algo == "dora":  # weight-decomposed: one magnitude per output channel
        return down_up + alpha + [(".dora_scale", (out, 1, *unit), "scale")]
    if algo == "tucker":
        if not spatial:
            return down_up + alpha
        return [(".lora_down.weight", (r, inp, *unit), "value"),
                (".lora_mid.weight", (r, r, *kernel), "value"),
                (".lora_up.weight", (out, r, *unit), "value")] + alpha
    if algo == "loha":
        if spatial:  # CP/tucker form: a core per factor, projections stored as [r, dim]
            return [(f".hada_{name}", shape, "value") for i in (1, 2) for name, shape in (
                (f"t{i}", (r, r, *kernel)), (f"w{i}_a", (r, out)), (f"w{i}_b", (r, inp)))] + alpha
        flat_in = inp * (kernel[0] * kernel[1] if kernel else 1)
        return [(f".hada_w{i}_{ab}", shape, "value") for i in (1, 2)
                for ab, shape in (("a", (out, r)), ("b", (r, flat_in)))] + alpha
    if algo == "lokr":
        (out_a, out_b), (in_a, in_b) = _factor(out), _factor(inp)
        if spatial:  # w1 whole, w2 as a tucker core and two projections
            tensors = [(".lokr_w1", (out_a, in_a)), (".lokr_t2", (r, r, *kernel)),
                       (".lokr_w2_a", (r, out_b)), (".lokr_w2_b", (r, in_b))]
        elif target.module.endswith(("ff_net_0_proj", "ff_net_2", "mlp_fc1", "mlp_fc2")):
            # LyCORIS' decompose_both: w1 low-rank too (done here on the wide MLP layers)
            tensors = [(".lokr_w1_a", (out_a, r)), (".lokr_w1_b", (r, in_a)),
                       (".lokr_w2_a", (out_b, r)), (".lokr_w2_b", (r, in_b))]
        else:  # a 1x1 conv stores its w2 flat, like a linear layer
            tensors = [(".lokr_w1", (out_a, in_a)),
                       (".lokr_w2_a", (out_b, r)), (".lokr_w2_b", (r, in_b))]
        return [(s, shape, "value") for s, shape in tensors] + alpha
    if algo == "full":
        bias = [(".diff_b", (out,), "value")] if target.bias else []
        return [(".diff", target.shape, "value")] + bias
    if algo == "peft":
        return [(".lora_A.weight", (r, inp, *kernel), "value"),
                (".lora_B.weight", (out, r, *unit), "value")]
    if algo == "diffusers-old":  # LoRACompatibleLinear in the UNet, LoRALinearLayer in the TE
        kind = ".lora_linear_layer" if target.module.startswith("text_encoder") else ".lora"
        return [(f"{kind}.down.weight", (r, inp), "value"),
                (f"{kind}.up.weight", (out, r), "value")]
    if algo == "xlabs":
        return [(".down.weight", (r, inp), "value"), (".up.weight", (out, r), "value")]
    raise AssertionError(f"unknown storage scheme {algo!r}")


def _rank(rank: int, size: str) -> int:
    """Tiny files shrink the rank by the same rule as every other dimension."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return tiny_dim(rank) if size == "tiny" else rank


def lora_specs(fmt: str, rank: int = 4, size: str = "tiny", dtype: str = "F16"
               ) -> list[TensorSpec]:
    """Names, dtypes and shapes of a synthetic LoRA file (alphas are F32 scalars)."""
    targets = lora_targets(fmt, size)
    algo, r = _FORMATS[fmt].algo, _rank(rank, size)
    return [TensorSpec(t.module + suffix, "F32" if role == "alpha" else dtype, shape)
            for t in targets for suffix, shape, role in _module_specs(algo, t, r)]


def _default_metadata(fmt: str, name: str, rank: int, alpha: float) -> dict[str, str]:
    """What the trainer of `fmt` writes: kohya's ss_* keys, or diffusers' bare format tag."""
    form = _FORMATS[fmt]
    if form.trainer is None:
        return {"format": "pt"} if fmt != "xlabs-flux" else {}
    trigger = name.replace("-", "_")
    metadata = {
        "ss_network_module": form.trainer,
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": _BASE_VERSIONS[form.base],
        "ss_output_name": name,
        "ss_tag_frequency": json.dumps({f"10_{trigger}": {trigger: 12, "1girl": 10, "solo": 7}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _ARCHITECTURES[form.base] + "/lora",
        "modelspec.title": name,
    }
    if form.base in ("sd1", "sd2"):
        metadata["ss_v2"] = str(form.base == "sd2")
    if form.network_args:
        args = {**form.network_args, "conv_dim": str(rank), "conv_alpha": f"{alpha:g}"}
        metadata["ss_network_args"] = json.dumps(args)
    return metadata


def write_lora(path: str | os.PathLike, fmt: str, rank: int = 4, alpha: float | None = None,
               size: str = "tiny", seed: int = 0, metadata: Mapping[str, str] | None = None,
               dtype: str = "F16") -> Path:
    """Write a synthetic LoRA of format `fmt` and return its path.

    `alpha` defaults to the rank (scale 1), stored as a 0-dim F32 tensor per module where the
    format has one. `metadata` None gives the trainer's usual metadata; a mapping replaces it
    ({} writes none). Values are deterministic per seed, like the checkpoints'.
    """
    path = Path(path)
    specs = lora_specs(fmt, rank, size, dtype)
    r = _rank(rank, size)
    alpha_value = float(r if alpha is None else alpha)
    if metadata is None:
        metadata = _default_metadata(fmt, path.stem, r, alpha_value)

    def values(spec: TensorSpec, file_seed: int):
        if spec.name.endswith(".alpha"):
            import torch

            return torch.tensor(alpha_value, dtype=torch.float32)
        tensor = synthetic_tensor(spec, file_seed)
        if spec.name.endswith(".dora_scale"):  # magnitudes: positive, around weight norms
            tensor.add_(1.0)
        return tensor

    return write_specs(path, specs, seed, metadata, values)
