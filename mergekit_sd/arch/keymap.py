"""Where each diffusers weight lives in a single-file checkpoint (ldm / sgm / comfy / BFL layouts).

LoRAs name diffusers modules and pipelines hold diffusers parameters, while the files people
merge use the original layouts. Rather than keeping long hand-written tables, the maps are
derived from diffusers' own single-file converters (`diffusers.loaders.single_file_utils`): the
converter is run on a *probe* state dict whose tensors keep each key's row count but collapse
every other dimension to 1, and whose values encode (key index, row). Whatever the converter
renames, splits (fused qkv), concatenates or permutes (FLUX's shift/scale swap), the rows of
its output say exactly which checkpoint rows each diffusers tensor is made of.

A `Source` reads: diffusers tensor = cat(checkpoint[key][start:stop] for each segment), reshaped
to the diffusers parameter's shape (transposed first where `transposed`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from types import SimpleNamespace

from mergekit_sd.arch.layouts import load_layout

_ROW_BITS = 25  # rows per key < 2**25 (FLUX's widest is 21504); key index in the bits above
_ROW_SPAN = float(1 << _ROW_BITS)

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Segment:
    key: str  # checkpoint key
    start: int  # first row (dim 0) of `key`
    stop: int


@dataclass(frozen=True, slots=True)
class Source:
    segments: tuple[Segment, ...]
    transposed: bool = False

    @property
    def whole_key(self) -> str | None:
        """The checkpoint key when this diffusers tensor is all of one key, else None."""
        if len(self.segments) == 1 and not self.transposed:
            return self.segments[0].key
        return None


ComponentMap = dict[str, Source]  # diffusers parameter name -> where it lives


# --- the probe ------------------------------------------------------------------------------------


def _probe(shapes: Shapes, rows_of: Callable[[str, tuple[int, ...]], int]):
    import torch

    probe, names = {}, []
    for index, (key, shape) in enumerate(shapes.items()):
        names.append(key)
        if not shape:
            probe[key] = torch.tensor(index * _ROW_SPAN, dtype=torch.float64)
            continue
        rows = rows_of(key, shape)
        column = torch.arange(rows, dtype=torch.float64) + index * _ROW_SPAN
        probe[key] = column.reshape(rows, *([1] * (len(shape) - 1)))
    return probe, names


def _decode(tensor, names: list[str]) -> Source | None:
    """The rows a converted probe tensor is made of; None when it is no pure rearrangement
    (a tensor the converter made up, or arithmetic on values). Vectorised: an SDXL file's
    probes hold over four million rows."""
    import torch

    if not torch.is_floating_point(tensor):
        return None
    transposed = False
    if tensor.ndim >= 2 and tensor.shape[0] == 1 and tensor.numel() == tensor.shape[1] > 1:
        transposed = True
    elif tensor.ndim and tensor.numel() != tensor.shape[0]:
        return None
    values = tensor.reshape(-1).to(torch.float64)
    if not values.numel():
        return None
    index = torch.floor(values / _ROW_SPAN)
    row = values - index * _ROW_SPAN
    if not bool(((row == torch.round(row)) & (index >= 0) & (index < len(names))).all()):
        return None
    index, row = index.long(), row.long()
    # a new segment wherever the key changes or the rows stop running on by one
    breaks = torch.ones_like(index, dtype=torch.bool)
    breaks[1:] = (index[1:] != index[:-1]) | (row[1:] != row[:-1] + 1)
    starts = torch.nonzero(breaks).flatten().tolist()
    stops = starts[1:] + [values.numel()]
    keys, rows = index[starts].tolist(), row[starts].tolist()
    segments = zip(keys, rows, starts, stops, strict=True)
    return Source(tuple(Segment(names[k], r, r + stop - start)
                        for k, r, start, stop in segments), transposed)


def _derive(shapes: Shapes, convert: Callable[[dict], dict],
            reference: Mapping[str, int] | None) -> ComponentMap:
    """Run `convert` on a probe of `shapes`. Some converters hard-code the widths of the full
    model (FLUX's 3072); if one fails on these shapes it is run on the `reference` widths and
    the segments are scaled back, which is exact for any model whose widths are a common
    multiple of the reference's (the real file itself, and the proportionally shrunk test
    models)."""
    probe, names = _probe(shapes, lambda key, shape: shape[0])
    try:
        converted = convert(dict(probe))
        scale = None
    except Exception:
        if reference is None:
            raise
        probe, names = _probe(shapes, lambda key, shape: reference.get(key, shape[0]))
        converted = convert(dict(probe))
        scale = {key: Fraction(shape[0], reference.get(key, shape[0]))
                 for key, shape in shapes.items() if shape}
    mapping: ComponentMap = {}
    for name, tensor in converted.items():
        source = _decode(tensor, names)
        if source is None:
            continue
        if scale is not None:
            source = _rescale(source, scale)
        mapping[name] = source
    return mapping


def _rescale(source: Source, scale: Mapping[str, Fraction]) -> Source:
    segments = []
    for seg in source.segments:
        factor = scale.get(seg.key, Fraction(1))
        start, stop = seg.start * factor, seg.stop * factor
        if start.denominator != 1 or stop.denominator != 1:
            raise ValueError(f"{seg.key}: rows {seg.start}:{seg.stop} do not scale to this model")
        segments.append(Segment(seg.key, int(start), int(stop)))
    return Source(tuple(segments), source.transposed)


# --- per component converters ---------------------------------------------------------------------

_UNET = "model.diffusion_model."
_DOWNSAMPLE = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.weight$")


def _unet_config(shapes: Shapes) -> dict:
    """The few settings the UNet converter reads, from the key names."""
    downsamples = sorted(int(m.group(1)) for k in shapes if (m := _DOWNSAMPLE.match(k)))
    if downsamples:
        layers_per_block = downsamples[0] - 1
    else:
        blocks = {int(k.split(".")[3]) for k in shapes if k.startswith(_UNET + "input_blocks.")}
        layers_per_block = max(blocks)
    config = {"layers_per_block": layers_per_block}
    if _UNET + "label_emb.0.0.weight" in shapes:  # SDXL's pooled text + size conditioning
        config["addition_embed_type"] = "text_time"
    return config


def _vae_config(shapes: Shapes, prefix: str) -> dict:
    stem = prefix + "encoder.down."
    levels = {int(k[len(stem):].split(".")[0]) for k in shapes if k.startswith(stem)}
    count = max(levels) + 1
    return {"down_block_types": ["DownEncoderBlock2D"] * count,
            "up_block_types": ["UpDecoderBlock2D"] * count}


def _sub(shapes: Shapes, prefix: str) -> dict:
    return {k: s for k, s in shapes.items() if k.startswith(prefix)}


def _converters(shapes: Shapes) -> dict[str, tuple[str, Callable[[dict], dict]]]:
    """component -> (checkpoint prefix, converter) for the components this file has."""
    from diffusers.loaders import single_file_utils as sfu

    found: dict[str, tuple[str, Callable[[dict], dict]]] = {}
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if _UNET + "input_blocks.0.0.weight" in shapes:
        unet = _unet_config(shapes)
        found["unet"] = (_UNET, lambda sd: sfu.convert_ldm_unet_checkpoint(sd, unet))
    elif any(k.startswith((_UNET + "double_blocks.", "double_blocks.")) for k in keys):
        found["transformer"] = (_UNET if has(_UNET) else "",
                                sfu.convert_flux_transformer_checkpoint_to_diffusers)
    elif any(k.startswith((_UNET + "joint_blocks.", "joint_blocks.")) for k in keys):
        found["transformer"] = (_UNET if has(_UNET) else "",
                                sfu.convert_sd3_transformer_checkpoint_to_diffusers)
    for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."):
        if has(prefix):
            found["text_encoder"] = (prefix, sfu.convert_ldm_clip_checkpoint)
    for prefix, component in (("cond_stage_model.model.", "text_encoder"),
                              ("conditioner.embedders.1.model.", "text_encoder_2")):
        if has(prefix):
            found[component] = (prefix, _open_clip(prefix, shapes))
    for prefix, component in (("text_encoders.clip_l.transformer.", "text_encoder"),
                              ("text_encoders.clip_g.transformer.", "text_encoder_2"),
                              ("text_encoders.t5xxl.transformer.", "text_encoder_3")):
        if has(prefix):
            found[component] = (prefix, _strip_prefix(prefix))
    for prefix in ("first_stage_model.", "vae."):
        if has(prefix + "encoder.") or has(prefix + "decoder."):
            vae = _vae_config(shapes, prefix)
            found["vae"] = (prefix, lambda sd, vae=vae: sfu.convert_ldm_vae_checkpoint(sd, vae))
    return found


def _open_clip(prefix: str, shapes: Shapes) -> Callable[[dict], dict]:
    from diffusers.loaders import single_file_utils as sfu

    width = shapes[prefix + "token_embedding.weight"][1]
    # the converter asks the model only for its width, when the file has no text_projection
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    return lambda sd: sfu.convert_open_clip_checkpoint(model, sd, prefix=prefix)


def _strip_prefix(prefix: str) -> Callable[[dict], dict]:
    """ComfyUI-style bundled encoders are already in transformers' own naming."""
    return lambda sd: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --- public ---------------------------------------------------------------------------------------

_REFERENCE_LAYOUTS = {"flux": "flux1-dev-bfl", "sd3": "sd3-medium-comfyui"}


@lru_cache(maxsize=4)
def _reference_rows(layout: str) -> dict[str, int]:
    rows = {}
    for entry in load_layout(layout):
        if entry.shape:
            for name in (entry.name, *entry.aliases):
                rows[name] = entry.shape[0]
    return rows


def diffusers_key_maps(shapes: Shapes) -> dict[str, ComponentMap]:
    """For each component of the file ("unet" or "transformer", "text_encoder", "text_encoder_2",
    "text_encoder_3", "vae"), every diffusers parameter it holds and where it lives.
    `shapes` is the file's header: key -> shape."""
    return dict(_cached_maps(tuple((k, tuple(s)) for k, s in shapes.items())))


@lru_cache(maxsize=8)
def _cached_maps(items: tuple) -> tuple:
    from mergekit_sd.arch import keymap_cache

    maps = keymap_cache.load(items)
    if maps is None:
        maps = _derive_maps(dict(items))
        keymap_cache.save(items, maps)
    return maps


def _bare_unet(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """A UNet-only file (the `unet` folder format): ldm keys without `model.diffusion_model.`."""
    return "input_blocks.0.0.weight" in shapes and not any(k.startswith(_UNET) for k in shapes)


def _unprefixed(maps: tuple) -> tuple:
    """Maps derived under `model.diffusion_model.` with the prefix taken off their keys again."""
    def strip(source: Source) -> Source:
        segments = tuple(Segment(s.key.removeprefix(_UNET), s.start, s.stop)
                         for s in source.segments)
        return Source(segments, source.transposed)

    return tuple((component, {name: strip(src) for name, src in mapping.items()})
                 for component, mapping in maps)


def _derive_maps(shapes: dict) -> tuple:
    if _bare_unet(shapes):  # the UNet converter reads only prefixed keys
        return _unprefixed(_derive_maps({_UNET + k: v for k, v in shapes.items()}))
    maps = []
    for component, (prefix, convert) in _converters(shapes).items():
        sub = _sub(shapes, prefix)
        reference = None
        if component == "transformer":
            family = "flux" if any("double_blocks." in k for k in sub) else "sd3"
            reference = _reference_rows(_REFERENCE_LAYOUTS[family])
            if not prefix:  # a transformer-only file: reference names carry the prefix
                reference = {k.removeprefix(_UNET): v for k, v in reference.items()}
        maps.append((component, _derive(sub, convert, reference)))
    return tuple(maps)
