"""Synthetic model files in the real key layouts of public releases: checkpoints and components.

No real weights are needed anywhere in the tests, benchmarks or the demo: these files have the
key names, shapes and dtypes of the files people download (from `mergekit_sd/arch/layouts`),
filled with deterministic random values, or left sparse (a valid header over a hole of zeros)
when only the header matters.

Sizes:
  "full"  the real shapes (a full SDXL is 13.8 GB in F32; write it sparse unless values matter);
  "tiny"  the same key names with every dimension d shrunk by one rule, `tiny_dim`:
          d stays if d <= 16, else becomes max(16, d // 64). Kernels (3x3) and latent or
          input channels (4, 9, 16) survive; 320, 640, 768 and 1024 become 16, 1280 -> 20,
          3072 -> 48. The rule is linear above 1024, so fused weights still split evenly in tiny
          files (FLUX qkv 9216 -> 144 = 3 x 48), which LoRAs that target q, k and v separately
          rely on. A tiny SDXL is about 4 MB, a tiny FLUX.1-dev about 11 MB.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import cache
from pathlib import Path

from mergekit_sd.arch.layouts import load_layout
from mergekit_sd.io.dtypes import torch_dtype
from mergekit_sd.io.writer import (
    StreamingWriter,
    TensorSpec,
    atomic_file,
    build_header,
    fsync_directory,
)

CHECKPOINT_VARIANTS = (
    # full checkpoints, as single files people keep in models/Stable-diffusion
    "sd1", "sd1-inpainting", "sd2", "sd2-inpainting",
    "sdxl", "sdxl-refiner", "sdxl-inpainting",
    "sd3-medium", "sd35-medium", "sd35-large",
    "flux-dev", "flux-schnell", "flux-fill",
    # one component each, as the unet / vae / text_encoders folders hold them
    "sd1-unet", "sdxl-unet", "flux-dev-transformer", "flux-schnell-transformer",
    "sd3-medium-transformer", "vae-sd", "vae-flux", "clip-l", "clip-g", "t5xxl",
)
SIZES = ("tiny", "full")
FILLS = ("random", "sparse")
CAST_DTYPES = ("F16", "BF16", "F32")

FLUX_VARIANTS = frozenset(v for v in CHECKPOINT_VARIANTS if v.startswith("flux"))

_UNET = "model.diffusion_model."
_CONV_IN = _UNET + "input_blocks.0.0.weight"
_CONV_IN_BIAS = _UNET + "input_blocks.0.0.bias"
_RANDOM_SCALE = 0.02  # the order of magnitude of trained weights; keeps merged values sane
_CHUNK = 1 << 20  # elements generated per randn call: bounds the fp32 scratch to 4 MB


def tiny_dim(d: int) -> int:
    """The one shrink rule of tiny files, applied to every dimension of every tensor."""
    return d if d <= 16 else max(16, d // 64)


def tiny_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(tiny_dim(d) for d in shape)


# --- full-size key lists, one builder per variant ------------------------------------------------


def _layout(name: str, *, components: tuple[str, ...] | None = None,
            optional: bool = False) -> list[TensorSpec]:
    """The keys of a layout, non-optional ones only unless asked (no EMA, scheduler ...)."""
    return [TensorSpec(k.name, k.dtype, k.shape) for k in load_layout(name)
            if (optional or not k.optional) and (components is None or k.component in components)]


def _strip(specs: list[TensorSpec], prefix: str) -> list[TensorSpec]:
    """The keys under `prefix`, renamed without it (a component saved on its own)."""
    return [replace(s, name=s.name[len(prefix):]) for s in specs if s.name.startswith(prefix)]


def _reshape(specs: list[TensorSpec], shapes: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
    missing = set(shapes) - {s.name for s in specs}
    if missing:  # a layout changed under us: better a loud failure than a silent non-variant
        raise KeyError(f"keys to reshape are not in the layout: {sorted(missing)}")
    return [replace(s, shape=shapes.get(s.name, s.shape)) for s in specs]


def _with_conv_in(specs: list[TensorSpec], channels: int) -> list[TensorSpec]:
    """Inpainting UNets take the latent, the mask and the masked image: 4 + 1 + 4 channels."""
    shape = next(s.shape for s in specs if s.name == _CONV_IN)
    return _reshape(specs, {_CONV_IN: (shape[0], channels, *shape[2:])})


def _open_clip(prefix: str, width: int, layers: int) -> list[TensorSpec]:
    """An OpenCLIP text tower in ldm/sgm naming, derived from SDXL's OpenCLIP-G (width 1280).

    Used for SD2's OpenCLIP-H (width 1024, 24 blocks, mlp 4096) and the refiner's OpenCLIP-G.
    Includes ln_final, text_projection and logit_scale, which these releases carry.
    """
    source = "conditioner.embedders.1.model."
    scale = {1280: width, 3 * 1280: 3 * width, 4 * 1280: 4 * width}
    specs = []
    for s in _layout("sdxl-sgm", components=("clip_g",), optional=True):
        block = re.search(r"\.resblocks\.(\d+)\.", s.name)
        if block and int(block.group(1)) >= layers:
            continue
        specs.append(TensorSpec(prefix + s.name[len(source):], s.dtype,
                                tuple(scale.get(d, d) for d in s.shape)))
    return specs


def _sd1() -> list[TensorSpec]:
    return _layout("sd1-ldm")


def _sd2() -> list[TensorSpec]:
    """SD2.1: the SD1 UNet and VAE with OpenCLIP-H conditioning.

    Cross-attention keys and values read 1024-wide text features, and the transformers'
    proj_in/proj_out are linear layers ([C, C]) rather than 1x1 convolutions.
    """
    specs = []
    for s in _sd1():
        if s.name.startswith("cond_stage_model."):
            continue
        if s.name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            s = replace(s, shape=(s.shape[0], 1024))
        elif s.name.startswith(_UNET) and re.search(r"\.proj_(in|out)\.weight$", s.name):
            s = replace(s, shape=s.shape[:2])
        specs.append(s)
    return specs + _open_clip("cond_stage_model.model.", width=1024, layers=24)


def _sdxl() -> list[TensorSpec]:
    return _layout("sdxl-sgm")


def _sdxl_refiner() -> list[TensorSpec]:
    """An approximation of sd_xl_refiner_1.0: real key names, the decisive shapes, SDXL's UNet.

    The real refiner has no CLIP-L (its only text encoder, OpenCLIP-G, is embedders.0), a
    2560-wide label embedding (pooled G + five size/crop/aesthetic embeddings) and 384 base
    channels. Its UNet also has a different depth and channel plan, which is not reproduced
    here: beyond conv_in and label_emb the UNet keeps SDXL base's structure.
    """
    unet_and_vae = [s for s in _sdxl() if not s.name.startswith("conditioner.")]
    specs = _reshape(unet_and_vae, {
        _UNET + "label_emb.0.0.weight": (1280, 2560),
        _CONV_IN: (384, 4, 3, 3),
        _CONV_IN_BIAS: (384,),
    })
    return specs + _open_clip("conditioner.embedders.0.model.", width=1280, layers=32)


def _sd3_medium() -> list[TensorSpec]:
    return _layout("sd3-medium-comfyui")


def _sd35(hidden: int, depth: int, pos_embed_tokens: int, dual_attention_blocks: int
          ) -> list[TensorSpec]:
    """An SD3.5 release file (MMDiT or MMDiT-X): the diffusion model and the VAE.

    Derived from SD3-Medium's joint blocks: widths scaled from 1536 to `hidden`, RMS qk-norm
    weights (ln_q/ln_k, one per 64-wide head) added to every attention, and in the first
    `dual_attention_blocks` blocks (MMDiT-X, 3.5 Medium) a second image self-attention `attn2`
    with a 9-way adaLN modulation. The last block's context stream is pre-only (no proj, no mlp)
    as in SD3. The 3.5 files ship without text encoders and without model_sampling.sigmas;
    the counts (909 keys for Medium, 1167 for Large) match the published files.
    """
    sd3 = _sd3_medium()
    vae = [s for s in sd3 if s.name.startswith("first_stage_model.")]
    dit = [s for s in sd3 if s.name.startswith(_UNET)]
    scale = {m * 1536: m * hidden for m in (1, 2, 3, 4, 6)}

    def scaled(s: TensorSpec, name: str | None = None) -> TensorSpec:
        return TensorSpec(name or s.name, s.dtype, tuple(scale.get(d, d) for d in s.shape))

    blocks = _UNET + "joint_blocks."
    specs = [scaled(s) for s in dit if not s.name.startswith(blocks)]
    specs = _reshape(specs, {_UNET + "pos_embed": (1, pos_embed_tokens, hidden)})
    regular = [s for s in dit if s.name.startswith(blocks + "0.")]
    last = [s for s in dit if s.name.startswith(blocks + "23.")]
    dtype = regular[0].dtype
    for n in range(depth):
        template, source = (last, "23.") if n == depth - 1 else (regular, "0.")
        block = f"{blocks}{n}."
        for s in template:
            specs.append(scaled(s, block + s.name[len(blocks + source):]))
        for stream in ("x_block", "context_block"):
            specs += [TensorSpec(f"{block}{stream}.attn.{norm}.weight", dtype, (64,))
                      for norm in ("ln_q", "ln_k")]
        if n < dual_attention_blocks:
            attn2 = f"{block}x_block.attn2."
            specs += [
                TensorSpec(attn2 + "qkv.weight", dtype, (3 * hidden, hidden)),
                TensorSpec(attn2 + "qkv.bias", dtype, (3 * hidden,)),
                TensorSpec(attn2 + "proj.weight", dtype, (hidden, hidden)),
                TensorSpec(attn2 + "proj.bias", dtype, (hidden,)),
                TensorSpec(attn2 + "ln_q.weight", dtype, (64,)),
                TensorSpec(attn2 + "ln_k.weight", dtype, (64,)),
            ]
            modulation = f"{block}x_block.adaLN_modulation.1."
            specs = _reshape(specs, {modulation + "weight": (9 * hidden, hidden),
                                     modulation + "bias": (9 * hidden,)})
    return specs + vae


def _flux_dev() -> list[TensorSpec]:
    return _layout("flux1-dev-bfl")


def _without_guidance(specs: list[TensorSpec]) -> list[TensorSpec]:
    """FLUX.1-schnell is distilled without guidance embedding: no guidance_in.* keys."""
    return [s for s in specs if "guidance_in." not in s.name]


def _flux_fill() -> list[TensorSpec]:
    """FLUX.1-Fill: the packed latent (64) plus the packed masked image (64) and mask (256)."""
    return _reshape(_flux_dev(), {_UNET + "img_in.weight": (3072, 384)})


def _flux_transformer() -> list[TensorSpec]:
    """The bare BFL names of flux1-dev.safetensors, as the layout's aliases give them."""
    return [TensorSpec(k.aliases[0], k.dtype, k.shape)
            for k in load_layout("flux1-dev-bfl") if k.component == "diffuser"]


_BUILDERS: dict[str, Callable[[], list[TensorSpec]]] = {
    "sd1": _sd1,
    "sd1-inpainting": lambda: _with_conv_in(_sd1(), 9),
    "sd2": _sd2,
    "sd2-inpainting": lambda: _with_conv_in(_sd2(), 9),
    "sdxl": _sdxl,
    "sdxl-refiner": _sdxl_refiner,
    "sdxl-inpainting": lambda: _with_conv_in(_sdxl(), 9),
    "sd3-medium": _sd3_medium,
    "sd35-medium": lambda: _sd35(1536, 24, 384 * 384, dual_attention_blocks=13),
    "sd35-large": lambda: _sd35(2432, 38, 192 * 192, dual_attention_blocks=0),
    "flux-dev": _flux_dev,
    "flux-schnell": lambda: _without_guidance(_flux_dev()),
    "flux-fill": _flux_fill,
    "sd1-unet": lambda: _strip(_sd1(), _UNET),
    "sdxl-unet": lambda: _strip(_sdxl(), _UNET),
    "flux-dev-transformer": _flux_transformer,
    "flux-schnell-transformer": lambda: _without_guidance(_flux_transformer()),
    "sd3-medium-transformer": lambda: _strip(_sd3_medium(), _UNET),
    "vae-sd": lambda: _strip(_sd1(), "first_stage_model."),
    "vae-flux": lambda: _strip(_flux_dev(), "vae."),
    "clip-l": lambda: _strip(_sd1(), "cond_stage_model.transformer."),
    "clip-g": lambda: _strip(_sd3_medium(), "text_encoders.clip_g.transformer."),
    "t5xxl": lambda: _strip(_flux_dev(), "text_encoders.t5xxl.transformer."),
}


def check_choice(kind: str, value, choices) -> None:
    """Refuse an unknown name with the nearest known one, as the rest of the project does."""
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(choices)}"
        raise ValueError(f"unknown {kind} {value!r}{hint}")


@cache
def _full_specs(variant: str) -> tuple[TensorSpec, ...]:
    check_choice("checkpoint variant", variant, CHECKPOINT_VARIANTS)
    # sorted by name, as the safetensors library orders a header, so files are reproducible
    return tuple(sorted(_BUILDERS[variant](), key=lambda s: s.name))


def _keep_blocks(specs: list[TensorSpec], fraction: float) -> list[TensorSpec]:
    """Only the first `fraction` of FLUX's double and single blocks (at least one of each)."""
    pattern = re.compile(r"(?:^|\.)(double_blocks|single_blocks)\.(\d+)\.")
    counts: dict[str, int] = {}
    for s in specs:
        m = pattern.search(s.name)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    keep = {kind: max(1, round(n * fraction)) for kind, n in counts.items()}
    kept = []
    for s in specs:
        m = pattern.search(s.name)
        if m is None or int(m.group(2)) < keep[m.group(1)]:
            kept.append(s)
    return kept


def checkpoint_specs(variant: str, size: str = "tiny", dtype: str | None = None,
                     blocks_fraction: float | None = None) -> list[TensorSpec]:
    """Names, dtypes and shapes of a synthetic `variant` file, in file order.

    `dtype` ("F16", "BF16", "F32") casts every floating key, as a file saved in that precision
    has them; integer keys keep theirs. `blocks_fraction` (FLUX only) keeps that fraction of
    the double and single blocks, for benchmarks that compare model sizes.
    """
    check_choice("size", size, SIZES)
    if dtype is not None:
        check_choice("dtype", dtype, CAST_DTYPES)
    specs = list(_full_specs(variant))
    if blocks_fraction is not None:
        if variant not in FLUX_VARIANTS:
            raise ValueError(f"blocks_fraction applies to FLUX variants only, not {variant!r}")
        if not 0 < blocks_fraction <= 1:
            raise ValueError(f"blocks_fraction must be in (0, 1], got {blocks_fraction}")
        specs = _keep_blocks(specs, blocks_fraction)
    if size == "tiny":
        specs = [replace(s, shape=tiny_shape(s.shape)) for s in specs]
    if dtype is not None:
        specs = [replace(s, dtype=dtype) if s.dtype in CAST_DTYPES else s for s in specs]
    return specs


# --- values --------------------------------------------------------------------------------------


def _key_seed(seed: int, name: str) -> int:
    """A generator seed per (file seed, tensor name): values do not depend on the key order."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in 63 bits


def _synthetic_chunks(spec: TensorSpec, seed: int, scale: float, scratch):
    """Yield `spec`'s values in order, `_CHUNK` elements at a time, as tensors of its dtype.

    Integer tensors in real checkpoints are position ids, so they count. Floats are drawn in
    fp32 chunks of a fixed size whatever the dtype, so an F16 file holds its F32 twin's values
    rounded; `scratch` is one reused fp32 buffer of `_CHUNK` elements.
    """
    import torch

    dtype = torch_dtype(spec.dtype)
    numel = math.prod(spec.shape)
    if not dtype.is_floating_point:
        for start in range(0, numel, _CHUNK):
            yield torch.arange(start, min(numel, start + _CHUNK)).to(dtype)
        return
    generator = torch.Generator().manual_seed(_key_seed(seed, spec.name))
    for start in range(0, numel, _CHUNK):
        part = scratch[:min(_CHUNK, numel - start)].normal_(0.0, scale, generator=generator)
        yield part if dtype == torch.float32 else part.to(dtype)


def synthetic_tensor(spec: TensorSpec, seed: int, scale: float = _RANDOM_SCALE):
    """Deterministic values for `spec`: normal(0, scale) for floats, 0, 1, 2 ... for integers."""
    import torch

    scratch = torch.empty(min(_CHUNK, max(1, math.prod(spec.shape))))
    parts = [p.clone() for p in _synthetic_chunks(spec, seed, scale, scratch)]
    out = torch.cat(parts) if parts else torch.empty(0, dtype=torch_dtype(spec.dtype))
    return out.reshape(spec.shape)


def write_specs(path: Path, specs: list[TensorSpec], seed: int,
                metadata: Mapping[str, str] | None,
                values: Callable[[TensorSpec, int], object] | None = None) -> Path:
    """Write `specs` through the streaming writer. Random values go out one chunk at a time,
    so memory stays at one fp32 scratch buffer of `_CHUNK` elements whatever the model size;
    `values(spec, seed)` may supply whole tensors instead."""
    import torch

    scratch = torch.empty(_CHUNK)
    with StreamingWriter(path, specs, metadata) as writer:
        for spec in specs:
            if values is not None:
                writer.write(spec.name, values(spec, seed))
                continue
            if spec.nbytes == 0:
                writer.write_bytes(spec.name, b"")
                continue
            offset = 0
            for part in _synthetic_chunks(spec, seed, _RANDOM_SCALE, scratch):
                raw = part.contiguous().view(torch.uint8).numpy()
                writer.write_part(spec.name, offset, raw)
                offset += raw.nbytes
    return Path(path)


def write_sparse(path: Path, specs: list[TensorSpec], metadata: Mapping[str, str] | None
                 ) -> Path:
    """A valid safetensors file whose data is a hole: full size on paper, no blocks on disk.

    Reads as zeros. Lets tests identify a 24 GB FLUX layout without 24 GB of disk or time.
    Atomic like the streaming writer: built as NAME.partial and renamed when complete.
    """
    path = Path(path)
    header, _ = build_header(specs, metadata)
    total = len(header) + sum(spec.nbytes for spec in specs)
    with atomic_file(path) as f:
        f.write(header)
        f.truncate(total)
    fsync_directory(path.parent)
    return path


def write_checkpoint(path: str | os.PathLike, variant: str, size: str = "tiny",
                     fill: str = "random", dtype: str | None = None, seed: int = 0,
                     metadata: Mapping[str, str] | None = None,
                     blocks_fraction: float | None = None) -> Path:
    """Write a synthetic `variant` file at `path` and return the path.

    fill="random": the same seed gives the same bytes, another seed another model with the
    same keys (what merges need). fill="sparse": header only, the data a hole of zeros.
    """
    check_choice("fill", fill, FILLS)
    specs = checkpoint_specs(variant, size, dtype, blocks_fraction)
    if fill == "sparse":
        return write_sparse(Path(path), specs, metadata)
    return write_specs(Path(path), specs, seed, metadata)
