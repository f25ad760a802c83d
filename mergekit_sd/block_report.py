"""`mergekit-sd blocks`: an architecture's block map with the number of keys in each block."""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.arch.architectures import ARCHITECTURES, block_counts, get_architecture
from mergekit_sd.errors import UserError

# the synthetic full-size variant whose keys stand for each architecture's real files
_VARIANT_OF = {"sd3.5-medium": "sd35-medium", "sd3.5-large": "sd35-large"}

_UNET = "model.diffusion_model."
_NUMBERED = ("input_blocks.", "middle_block.", "output_blocks.")
# sd_xl_refiner_1.0's UNet (sgm's sd_xl_refiner.yaml: channel_mult 1, 2, 4, 4, two res blocks
# a level, 4-deep transformers at attention_resolutions 4 and 2 and in the middle block).
# The synthetic refiner keeps SDXL base's three-level UNet (its docstring says so), which
# would show IN09-IN11 empty: its numbered blocks are built from these facts instead.
REFINER_MULTS = (1, 2, 4, 4)  # channels of each level, in multiples of 384
REFINER_DEPTHS = (0, 4, 4, 0)  # transformer depth after each res block, by level; 0: none
REFINER_MIDDLE_DEPTH = 4


def keys_of(target: str) -> tuple[str, list[str], str, str]:
    """(architecture id, keys, diffusion-model prefix, source description) for a name or file."""
    path = Path(target)
    if path.exists():
        from mergekit_sd.arch.identify import identify
        from mergekit_sd.io.header import read_header

        header = read_header(path)
        found = identify(header)
        if found.architecture not in ARCHITECTURES or found.kind == "lora":
            raise UserError(f"{path}: is {found.label}, which has no block map; give a "
                            "checkpoint or diffusion model")
        prefix = next(c.prefix for c in found.components if c.slot == "diffusion_model")
        return found.architecture, list(header.tensors), prefix, str(path)
    try:
        arch = get_architecture(target)
    except KeyError as exc:
        raise UserError(f"{exc.args[0]}; or give a model file that exists") from None
    from mergekit_sd.testing.checkpoints import checkpoint_specs

    keys = [s.name for s in checkpoint_specs(_VARIANT_OF.get(arch.id, arch.id), size="full")]
    if arch.id == "sdxl-refiner":
        keys = [k for k in keys if not k.startswith(tuple(_UNET + n for n in _NUMBERED))]
        keys += [_UNET + k for k in sgm_unet_block_keys(REFINER_MULTS, REFINER_DEPTHS,
                                                         REFINER_MIDDLE_DEPTH)]
    return arch.id, keys, _UNET, "its public release"


def sgm_unet_block_keys(mults: tuple[int, ...], depths: tuple[int, ...], middle_depth: int,
                        res_blocks: int = 2) -> list[str]:
    """The keys of an sgm UNet's numbered blocks (input_blocks, middle_block, output_blocks),
    relative to the diffusion model, for a UNet with a level per entry of `mults` (its
    channel multiplier) and `depths` (the transformer depth after each of its res blocks, 0
    for none), with linear projections in and out of each transformer as SDXL base and refiner
    have."""
    return [*_down_keys(mults, depths, res_blocks), *_res_block("middle_block.0.", skip=False),
            *_transformer("middle_block.1.", middle_depth),
            *_res_block("middle_block.2.", skip=False), *_up_keys(depths, res_blocks)]


def _down_keys(mults: tuple[int, ...], depths: tuple[int, ...], res_blocks: int) -> list[str]:
    """conv_in, then each level's res blocks (and transformers) and a downsample but last."""
    keys = [f"input_blocks.0.0.{p}" for p in ("weight", "bias")]
    block = 1
    for level, depth in enumerate(depths):
        for index in range(res_blocks):
            # a res block that changes the channel count carries a 1x1 skip convolution
            changes = index == 0 and level > 0 and mults[level] != mults[level - 1]
            keys += _res_block(f"input_blocks.{block}.0.", skip=changes)
            keys += _transformer(f"input_blocks.{block}.1.", depth)
            block += 1
        if level < len(depths) - 1:
            keys += [f"input_blocks.{block}.0.op.{p}" for p in ("weight", "bias")]
            block += 1
    return keys


def _up_keys(depths: tuple[int, ...], res_blocks: int) -> list[str]:
    """Each level from the deepest: one res block more than down, the last with an upsample
    (but the top level's)."""
    keys: list[str] = []
    block = 0
    for level, depth in reversed(list(enumerate(depths))):
        for index in range(res_blocks + 1):
            keys += _res_block(f"output_blocks.{block}.0.", skip=True)  # input and skip joined
            keys += _transformer(f"output_blocks.{block}.1.", depth)
            if level > 0 and index == res_blocks:
                keys += [f"output_blocks.{block}.{2 if depth else 1}.conv.{p}"
                         for p in ("weight", "bias")]
            block += 1
    return keys


def _res_block(at: str, skip: bool) -> list[str]:
    layers = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    if skip:
        layers.append("skip_connection")
    return [f"{at}{layer}.{p}" for layer in layers for p in ("weight", "bias")]


def _transformer(at: str, depth: int) -> list[str]:
    if not depth:
        return []
    keys = [f"{at}{layer}.{p}" for layer in ("norm", "proj_in", "proj_out")
            for p in ("weight", "bias")]
    for index in range(depth):
        inner = f"{at}transformer_blocks.{index}."
        for attention in ("attn1", "attn2"):
            keys += [f"{inner}{attention}.to_{w}.weight" for w in ("q", "k", "v")]
            keys += [f"{inner}{attention}.to_out.0.{p}" for p in ("weight", "bias")]
        keys += [f"{inner}{layer}.{p}" for layer in ("ff.net.0.proj", "ff.net.2", "norm1",
                                                     "norm2", "norm3")
                 for p in ("weight", "bias")]
    return keys


def show_block_map(target: str) -> None:
    from rich.table import Table

    from mergekit_sd.data_console import data_console

    arch_id, keys, prefix, source = keys_of(target)
    arch = ARCHITECTURES[arch_id]
    counts = block_counts(arch, keys, prefix)
    table = Table()
    table.add_column("block")
    table.add_column("keys", justify="right")
    table.add_column("what it holds")
    for block, count in counts.items():
        table.add_row(block, str(count), _describe(arch.family, block))
    console = data_console()
    # the title on a line of its own, not the table's: a table title wraps at the table's
    # width, and would cut the file's path in two
    console.print(f"{arch.label} blocks (key counts in {source})", soft_wrap=True, style="italic")
    console.print(table)


def _describe(family: str, block: str) -> str:
    if block == "BASE":
        return "text encoders, VAE, embeddings and final layers outside numbered blocks"
    stem = block.rstrip("0123456789")
    return {"IN": "UNet input (down) block", "M": "UNet middle block",
            "OUT": "UNet output (up) block", "D": "double-stream block (image + text)",
            "S": "single-stream block", "J": "joint block (MMDiT)"}.get(stem, "")
