"""`mergekit-sd blocks`: an architecture's block map with the number of keys in each block."""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.arch.architectures import ARCHITECTURES, block_counts, get_architecture
from mergekit_sd.errors import UserError

# the synthetic full-size variant whose keys stand for each architecture's real files
_VARIANT_OF = {"sd3.5-medium": "sd35-medium", "sd3.5-large": "sd35-large"}


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

    specs = checkpoint_specs(_VARIANT_OF.get(arch.id, arch.id), size="full")
    return arch.id, [s.name for s in specs], "model.diffusion_model.", "its public release"


def show_block_map(target: str) -> None:
    from rich.console import Console
    from rich.table import Table

    arch_id, keys, prefix, source = keys_of(target)
    arch = ARCHITECTURES[arch_id]
    counts = block_counts(arch, keys, prefix)
    table = Table(title=f"{arch.label} blocks (key counts in {source})", title_justify="left")
    table.add_column("block")
    table.add_column("keys", justify="right")
    table.add_column("what it holds")
    for block, count in counts.items():
        table.add_row(block, str(count), _describe(arch.family, block))
    Console().print(table)


def _describe(family: str, block: str) -> str:
    if block == "BASE":
        return "text encoders, VAE, embeddings and final layers outside numbered blocks"
    stem = block.rstrip("0123456789")
    return {"IN": "UNet input (down) block", "M": "UNet middle block",
            "OUT": "UNet output (up) block", "D": "double-stream block (image + text)",
            "S": "single-stream block", "J": "joint block (MMDiT)"}.get(stem, "")
